"""One lock file per SoftHSM2 token, shared by every process that uses the token.

Why: SoftHSM2 2.6.1 (Debian bookworm's, the development and test HSM) keeps each token
object in a file of its own, and two of its bugs, fixed upstream after 2.6.1 (SoftHSMv2
pull requests 576 and 578), let one process's C_FindObjects spoil another process's
token writes: the writer releases its file lock before its buffered bytes reach the file,
and a reader that finds the file empty marks the object invalid. Measured here with two
plain python-pkcs11 processes on one token (one making and destroying token keys, the
other searching it): about 1 in 150 new keys came back with an empty label and no value,
or read back whole in the writer but were found empty by every later process; a process
that only used a key, or only logged in, spoiled none. In keysvc that was a key imported
while the rewrap process started (it searches the tokens) failing later as "names no single
token object", and audit anchors written while another worker searched them.

So: token-object searches and attribute reads hold the lock shared, token-object writes
(create, generate, unwrap into the token, set an attribute, destroy) hold it exclusively.
Using a key, and everything done with session objects (the hot paths), takes no lock.
The lock is a flock(2) file beside the token's directory, so it spans every process on
this machine that opens the token: server workers, the rewrap process, replicas, the admin
commands. It is never held across a database call, so it cannot join a deadlock with the
database's locks. A production HSM serialises its own store and needs none: the lock is
taken only when the module is SoftHSM2 with a file store (`for_token`).
"""
from __future__ import annotations

import fcntl
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from keysvc.hsm.errors import HsmUnavailable

NONE, SHARED, EXCLUSIVE = 0, 1, 2
DEFAULT_SOFTHSM_CONF = "/etc/softhsm/softhsm2.conf"


class StoreLock:
    """A readers-writer lock over one token's store, re-entrant within this process.

    Two flock(2) files: the store lock itself, and a turnstile that a writer holds while it
    waits, so that a stream of searches (another process's loop) cannot starve it: a reader
    passes the turnstile (shared, for a moment) before it takes the store lock. Waits are
    bounded (`timeout`, then HsmUnavailable). Callers hold the process's PKCS#11 module
    lock (`hsm.token`), so one thread at a time uses an instance; the files are reopened
    after a fork (a flock belongs to the open file, which a child would share)."""

    def __init__(self, path: Path | None, name: str, timeout: float = 5.0) -> None:
        self.path = path
        self.name = name
        self.timeout = timeout
        self._fds: tuple[int, int] = (-1, -1)
        self._pid = 0
        self._held = NONE

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._hold(SHARED):
            yield

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._hold(EXCLUSIVE):
            yield

    @contextmanager
    def _hold(self, mode: int) -> Iterator[None]:
        if self.path is None or self._held >= mode:
            yield
            return
        before = self._held
        if before:  # shared to exclusive: let go first (an upgrade could wait on a writer
            self._release()  # that waits on us)
        self._take(mode)
        try:
            yield
        finally:
            self._release()
            if before:
                self._take(before)

    def _files(self) -> tuple[int, int]:
        if self._fds[0] < 0 or self._pid != os.getpid():
            assert self.path is not None
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
            self._fds = (os.open(self.path, flags, 0o600),
                         os.open(self.path.with_suffix(".turn"), flags, 0o600))
            self._pid = os.getpid()
            self._held = NONE
        return self._fds

    def _take(self, mode: int) -> None:
        store, turn = self._files()
        deadline = time.monotonic() + self.timeout
        if mode == EXCLUSIVE:
            self._wait(turn, fcntl.LOCK_EX, deadline)
            try:
                self._wait(store, fcntl.LOCK_EX, deadline)
            finally:
                fcntl.flock(turn, fcntl.LOCK_UN)
        else:
            self._wait(turn, fcntl.LOCK_SH, deadline)
            fcntl.flock(turn, fcntl.LOCK_UN)
            self._wait(store, fcntl.LOCK_SH, deadline)
        self._held = mode

    def _wait(self, fd: int, op: int, deadline: float) -> None:
        pause = 0.0001
        while True:
            try:
                fcntl.flock(fd, op | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise HsmUnavailable(f"token {self.name}: another process holds its "
                                         "object store") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.002)

    def _release(self) -> None:
        fcntl.flock(self._fds[0], fcntl.LOCK_UN)
        self._held = NONE


def softhsm_token_dir(module: str) -> Path | None:
    """SoftHSM2's token directory when `module` is SoftHSM2 with its file store, else None."""
    if not os.path.basename(module).startswith("libsofthsm2"):
        return None
    conf = Path(os.environ.get("SOFTHSM2_CONF", DEFAULT_SOFTHSM_CONF))
    try:
        text = conf.read_text()
    except OSError:
        return None
    settings = dict(re.findall(r"^\s*([\w.]+)\s*=\s*(.*?)\s*$", text, re.MULTILINE))
    if settings.get("objectstore.backend", "file") != "file":
        return None
    tokendir = settings.get("directories.tokendir")
    return Path(tokendir) if tokendir else None


def for_token(module: str, label: str, timeout: float) -> StoreLock:
    """The lock of the token `label` (a file beside the token directories: SoftHSM2 takes
    only directories there for tokens), or one that does nothing."""
    tokendir = softhsm_token_dir(module)
    if tokendir is None or not tokendir.is_dir():
        return StoreLock(None, label)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", label)
    return StoreLock(tokendir / f".keysvc-store-{safe}.lock", label, timeout)
