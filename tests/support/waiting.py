"""Waiting for a server to get somewhere, without sleeping a fixed time."""
from __future__ import annotations

import time
from typing import Callable


def until(check: Callable[[], bool], timeout: float = 20.0, every: float = 0.2) -> bool:
    """True as soon as `check()` is; False if it never was within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return False
