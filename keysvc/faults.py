"""Crash points for the crash-consistency tests: `KEYSVC_FAULT=<point>` kills the process
with SIGKILL when it reaches that point, as a power cut or kill -9 would.

Off unless the variable is set; a production unit never sets it. Each point sits between
a change in the token and the database commit that records it, where a crash is hardest.
"""
from __future__ import annotations

import os
import signal


def point(name: str) -> None:
    if os.environ.get("KEYSVC_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
