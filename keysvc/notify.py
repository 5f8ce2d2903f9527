"""systemd's notification protocol (sd_notify), without libsystemd.

Under `Type=notify` (deploy/keysvc.service) systemd waits for READY=1 before it counts the
service as started, kills and restarts it when WATCHDOG=1 stops coming for `WatchdogSec`,
and shows STATUS= in `systemctl status`. Each is one datagram to $NOTIFY_SOCKET; without
that variable (not run by systemd) every call here does nothing.

With several processes (`--processes N`) only the supervisor speaks: the workers are its
children, and `NotifyAccess=main` ignores them.
"""
from __future__ import annotations

import os
import socket


def notify(*states: str) -> bool:
    """Send `states` (e.g. "READY=1") in one datagram; False when not run by systemd or
    when the socket refuses (the service goes on either way)."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall("\n".join(states).encode())
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when systemd asks
    for none of this process (WATCHDOG_PID names another: a worker of the supervisor)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid.isdigit() and int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000 / 2


class Watchdog:
    """WATCHDOG=1 at most every half `WatchdogSec`, from a loop that calls `tick` often."""

    def __init__(self) -> None:
        import time
        self._clock = time.monotonic
        self.every = watchdog_interval()
        self._last = 0.0

    def tick(self) -> None:
        if self.every is not None and self._clock() - self._last >= self.every:
            self._last = self._clock()
            notify("WATCHDOG=1")
