"""Giving a large file's memory back to the operating system once its call is done.

A 64 MiB file allocates hundreds of MB in small pieces (parsed elements, per-key records,
rows). Freed, they stay in the allocator's heaps: measured here, a server that had processed
one 64 MiB S1SP file still held some 370 MB more when the next call began.
malloc_trim(0) hands glibc's free pages back (a few milliseconds, only after calls that
carried a large file); what Python's own allocator keeps is not reached.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from contextlib import contextmanager
from typing import Iterator

LARGE = 8 * 1024 * 1024  # files at least this big are followed by a trim

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
_trim = getattr(_libc, "malloc_trim", None)  # glibc only; elsewhere nothing to do


def fewer_heaps(arenas: int = 2) -> None:
    """At start, before the server's threads: glibc gives each thread that allocates under
    contention a heap of its own (up to 8 per core), and pieces freed in many heaps are
    handed back worse. Measured with a 64 MiB file: the S1SP peak 710 MiB instead of 766,
    a DCO call right after it 742 instead of 803."""
    mallopt = getattr(_libc, "mallopt", None)
    if mallopt is not None:
        mallopt(-8, arenas)  # M_ARENA_MAX


@contextmanager
def given_back_after(data: bytes) -> Iterator[None]:
    try:
        yield
    finally:
        if _trim is not None and len(data) >= LARGE:
            _trim(0)
