"""The server process keeps its secrets to itself (issue 16, a hardened process).

At start, before any key, PIN or file is touched:
- not dumpable (`prctl(PR_SET_DUMPABLE, 0)`): no core file, and /proc/PID/mem and ptrace
  closed to other users' processes;
- RLIMIT_CORE 0: no core file even if something makes the process dumpable again;
- memory locked where the limit allows (`mlockall`), so that key buffers are never
  written to swap; when it cannot be, a log line and the `keysvc_memory_locked` metric say
  so (0);
- umask 077: every file made later (the database and its WAL, audit files and their
  rotations, token files) is 0600 and every directory 0700.

PINs given in the environment (KEYSVC_<PARTITION>_PIN) would stay readable in
/proc/PID/environ for the life of the process (the kernel keeps the original block, whatever
os.environ says). `keep_pins_out_of_environ` moves them into a pipe and re-executes the
server without them; the new process reads them from the pipe once.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import resource
import sys
from dataclasses import dataclass

from keysvc.config import PARTITIONS

log = logging.getLogger("keysvc.hardening")

PR_SET_DUMPABLE = 4
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
PIN_FD = "KEYSVC_PIN_FD"


@dataclass(frozen=True)
class Hardened:
    dumpable: bool
    core_limit: int
    memory_locked: bool


def harden_early() -> None:
    """First thing, before a PIN is read: private files, no core, not dumpable."""
    os.umask(0o077)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def swap_present() -> bool:
    try:
        return len(open("/proc/swaps").read().splitlines()) > 1
    except OSError:
        return True  # cannot tell: assume there is


def harden(lock_memory: str = "auto") -> Hardened:
    harden_early()
    libc = ctypes.CDLL(None, use_errno=True)
    dumpable = libc.prctl(3, 0, 0, 0, 0) != 0  # PR_GET_DUMPABLE
    locked = False
    mode = str(lock_memory).lower()
    if mode == "auto" and not swap_present():
        log.info("no swap on this host: memory is not locked (nothing to lock against)")
    if mode == "true" or (mode == "auto" and swap_present()):
        # Locked as pages are touched (MCL_ONFAULT), so memory merely reserved (thread
        # stacks, arenas) costs nothing; and only without a finite limit, where a later
        # allocation under load could otherwise fail instead of merely not being locked.
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        if soft == resource.RLIM_INFINITY or os.geteuid() == 0:
            locked = libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) == 0
        if not locked:
            log.warning("memory is not locked (RLIMIT_MEMLOCK %s%s): key buffers may reach "
                        "swap; raise the limit (LimitMEMLOCK=infinity) or turn off swap",
                        "unlimited" if soft == resource.RLIM_INFINITY else soft,
                        "" if not ctypes.get_errno() else
                        f", {os.strerror(ctypes.get_errno())}")
    from keysvc.observability import MEMORY_LOCKED
    MEMORY_LOCKED.set(1 if locked else 0)
    h = Hardened(dumpable, resource.getrlimit(resource.RLIMIT_CORE)[0], locked)
    log.info("process hardened: dumpable=%d core=%d memory_locked=%d", h.dumpable,
             h.core_limit, h.memory_locked)
    return h


def keep_pins_out_of_environ() -> None:
    """If PINs came in the environment, re-execute without them, handing them over in a
    pipe. Returns only when the environment holds no PIN."""
    names = [f"KEYSVC_{p.upper()}_PIN" for p in PARTITIONS]
    pins = {n: os.environ[n] for n in names if os.environ.get(n)}
    if not pins:
        return
    r, w = os.pipe()
    data = json.dumps(pins).encode()
    if len(data) > 60_000:
        raise SystemExit("PINs too long")
    os.write(w, data)  # fits in the pipe's buffer: nobody reads before the exec
    os.close(w)
    os.set_inheritable(r, True)
    env = {k: v for k, v in os.environ.items() if k not in names}
    env[PIN_FD] = str(r)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "keysvc.cli", *sys.argv[1:]], env)


def pins_from_pipe() -> dict[str, str]:
    """The PINs the parent handed over (setting name -> PIN), read once; {} without."""
    fd = os.environ.pop(PIN_FD, "")
    if not fd:
        return {}
    with os.fdopen(int(fd), "rb") as f:
        pins = json.loads(f.read() or b"{}")
    return {k[len("KEYSVC_"):].lower(): v for k, v in pins.items()}
