"""The audit trail no one can silence (issue 14). The log itself is `log.py` (AuditLog);
the package imports nothing, so that the chain's and the sinks' formats (`chain.py`,
`sinks.py`) serve the client's `audit export` and `audit verify --sink` without the
server's dependencies."""
