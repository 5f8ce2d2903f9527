"""Giving a large file's memory back to the operating system once its call is done.

A 64 MiB file allocates hundreds of MB in small pieces (parsed elements, per-key records,
rows). Freed, they stay in glibc's heaps: measured here, a server that had processed one
64 MiB S1SP file then held 700 MB more while the next file's DCO call ran, and a service's
peak grows with every large file it has seen. malloc_trim(0) hands the free pages back
(a few milliseconds, only after calls that carried a large file).
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
    contention a heap of its own (up to 8 per core), and a large file's pieces freed in a
    thread pool's heaps are not handed back as a whole. Measured: a DCO call after an S1SP
    one of 64 MiB started from 470 MB instead of 100."""
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
