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

import errno
import fcntl
import logging
import os
import re
import time
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from keysvc.hsm.errors import HsmUnavailable

log = logging.getLogger("keysvc.hsm")

NONE, SHARED, EXCLUSIVE = 0, 1, 2
_ALL: "weakref.WeakSet[StoreLock]" = weakref.WeakSet()


class StoreBusy(HsmUnavailable):
    """Another process held the store past the wait: the token is busy, not broken."""


class StoreLock:
    """A readers-writer lock over one token's store (or, `for_tokens`, over the token
    directories' own files), re-entrant within this process.

    Two flock(2) files: the lock itself, and a turnstile that a writer holds while it
    waits, so that a stream of searches (another process's loop) cannot starve it: a reader
    passes the turnstile (shared, for a moment) before it takes the lock. Waits are
    bounded (`timeout`, then StoreBusy). Callers hold the process's PKCS#11 module lock
    (`hsm.token`), so one thread at a time uses an instance. A forked child forgets the
    parent's files (a flock belongs to the open file, which the child would share)."""

    def __init__(self, path: Path | None, name: str, timeout: float = 5.0) -> None:
        self.path = path
        self.name = name
        self.timeout = timeout
        self._fds: tuple[int, int] = (-1, -1)
        self._held = NONE
        _ALL.add(self)

    @contextmanager
    def shared(self, timeout: float | None = None) -> Iterator[None]:
        with self._hold(SHARED, timeout):
            yield

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._hold(EXCLUSIVE, None):
            yield

    @contextmanager
    def _hold(self, mode: int, timeout: float | None) -> Iterator[None]:
        if self.path is None or self._held >= mode:
            yield
            return
        if self._held:  # shared to exclusive would drop the shared hold (flock converts
            raise RuntimeError("store lock: a write inside a search")  # by letting go)
        self._take(mode, self.timeout if timeout is None else timeout)
        fd = self._fds[0]
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            self._held = NONE

    def _files(self) -> tuple[int, int]:
        if self._fds[0] < 0:
            assert self.path is not None
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
            opened: list[int] = []
            try:
                for path in (self.path, self.path.with_suffix(".turn")):
                    opened.append(os.open(path, flags, 0o600))
            except OSError as exc:
                for fd in opened:
                    os.close(fd)
                raise HsmUnavailable(f"{self.name}: cannot open its store lock "
                                     f"{path} ({errno.errorcode.get(exc.errno or 0, exc)})"
                                     ) from None
            self._fds = (opened[0], opened[1])
        return self._fds

    def _take(self, mode: int, timeout: float) -> None:
        store, turn = self._files()
        deadline = time.monotonic() + timeout
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
                    raise StoreBusy(f"{self.name}: another process holds its object store"
                                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.002)

    def close(self) -> None:
        for fd in self._fds:
            if fd >= 0:
                os.close(fd)
        self._fds, self._held = (-1, -1), NONE



def _after_fork_in_child() -> None:
    """Drop our copies of the parent's files without unlocking them (closing a copy lets go
    of nothing: the parent's holds stay the parent's)."""
    for lock in list(_ALL):
        lock.close()


os.register_at_fork(after_in_child=_after_fork_in_child)


def softhsm_conf() -> Path | None:
    """The configuration SoftHSM2 reads: SOFTHSM2_CONF, else the user's, else the system's
    (its own search order)."""
    if os.environ.get("SOFTHSM2_CONF"):
        return Path(os.environ["SOFTHSM2_CONF"])
    for candidate in (Path.home() / ".config/softhsm2/softhsm2.conf",
                      Path("/etc/softhsm/softhsm2.conf")):
        if candidate.is_file():
            return candidate
    return None


def is_softhsm2(module: str) -> bool:
    return os.path.basename(os.path.realpath(module)).startswith("libsofthsm2")


def softhsm_token_dir(module: str) -> Path | None:
    """SoftHSM2's token directory when `module` is SoftHSM2 with its file store, else None.
    Read as SoftHSM2 reads its file: `name = value`, a `#` starts a comment."""
    if not is_softhsm2(module):
        return None
    conf = softhsm_conf()
    try:
        text = conf.read_text() if conf else ""
    except OSError:
        text = ""
    settings = {}
    for line in text.splitlines():
        name, eq, value = line.split("#", 1)[0].partition("=")
        if eq:
            settings[name.strip()] = value.strip()
    if settings.get("objectstore.backend", "file") != "file":
        return None
    tokendir = settings.get("directories.tokendir")
    if not tokendir:
        log.error("%s is SoftHSM2 but its token directory is not known (%s): the token "
                  "store lock is off", module, conf)
        return None
    return Path(tokendir)


def for_token(module: str, label: str, timeout: float) -> StoreLock:
    """The lock of the token `label` (a file beside the token directories: SoftHSM2 takes
    only directories there for tokens), or one that does nothing."""
    tokendir = softhsm_token_dir(module)
    name = f"token {label}"
    if tokendir is None:
        return StoreLock(None, name)
    return StoreLock(tokendir / f".keysvc-store-{_safe(label)}.lock", name, timeout)


def for_tokens(module: str, timeout: float) -> StoreLock:
    """The lock of the token directories' own files: every C_Login rewrites its token's
    file, which C_Initialize and the slot list (C_GetTokenInfo of every token) read. Held
    exclusively around a login, shared around a (re-)initialise and the slot list."""
    tokendir = softhsm_token_dir(module)
    if tokendir is None:
        return StoreLock(None, "the token list")
    return token_list_lock(tokendir, timeout)


def token_list_lock(tokendir: Path, timeout: float) -> StoreLock:
    """The token list's lock of a known token directory (the development set-up's)."""
    return StoreLock(tokendir / ".keysvc-tokens.lock", "the token list", timeout)


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)
