"""Custody of the long-lived keys: their versions, rotation with online rewrap, and the
M-of-N backup and restore of a partition (issue 15).

The token is the only authority on which versions exist: the database may claim anything.
"""
