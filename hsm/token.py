"""One logged-in token with a bounded, thread-safe pool of sessions.

PKCS#11 login state belongs to the application, not the session: we log in once on an
anchor session that stays open, and pool sessions opened without a PIN share that login.
A session that reports a broken-session return code is closed and replaced, never reused.

python-pkcs11 calls C_Initialize(NULL), which by the PKCS#11 standard promises the module
that no two threads call it at once; SoftHSM2 then turns its own locking off, and
concurrent calls corrupt it (measured here: CKR_GENERAL_ERROR, then a segfault). So every
borrow of a session also holds the module's lock: the service stays multi-threaded for
parsing, certificates and the database, and the HSM sees one caller at a time. The lock
wait is bounded like the pool: past `acquire_timeout` the caller gets HsmUnavailable.
If the token itself goes away, every call fails fast with HsmUnavailable and the next call
after `retry_after` seconds tries to open the token again, so the service heals without a
restart.
"""
from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import pkcs11
import pkcs11.exceptions as px

from hsm.errors import BROKEN_SESSION, HsmUnavailable, translate

_LIBS: dict[str, Any] = {}
_LIBS_LOCK = threading.Lock()
_MODULE_LOCKS: dict[str, threading.RLock] = {}


def module_lock(module: str) -> threading.RLock:
    with _LIBS_LOCK:
        return _MODULE_LOCKS.setdefault(module, threading.RLock())


def _load(module: str) -> Any:
    with _LIBS_LOCK:
        if module not in _LIBS:
            _LIBS[module] = pkcs11.lib(module)
        return _LIBS[module]


@dataclass(frozen=True)
class TokenConfig:
    module: str
    label: str
    pin: str = field(repr=False)
    pool_size: int = 4
    acquire_timeout: float = 5.0
    retry_after: float = 1.0


class Session:
    """A pooled PKCS#11 session with a per-session cache of key objects by label.

    Key objects in python-pkcs11 are bound to the session that found them, so the cache
    lives here; it saves a C_FindObjects round trip on every device key wrap.
    """

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.keys: dict[tuple, Any] = {}
        self.broken = False


class Token:
    def __init__(self, config: TokenConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._idle: queue.LifoQueue[Session] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(config.pool_size)
        self._anchor: Any = None
        self._token: Any = None
        self._generation = 0
        self._down_since: float | None = None
        self.in_use = 0
        self._module_lock = module_lock(config.module)

    # ------------------------------------------------------------------ lifecycle
    def _ensure_open(self) -> None:
        with self._lock:
            if self._anchor is not None:
                return
            if self._down_since is not None and \
                    time.monotonic() - self._down_since < self.config.retry_after:
                raise HsmUnavailable(f"token {self.config.label} unavailable")
            try:
                lib = _load(self.config.module)
                try:
                    self._token = lib.get_token(token_label=self.config.label)
                except (px.NoSuchToken, *BROKEN_SESSION):
                    lib.reinitialize()
                    self._token = lib.get_token(token_label=self.config.label)
                try:
                    self._anchor = self._token.open(rw=True, user_pin=self.config.pin)
                except px.UserAlreadyLoggedIn:
                    self._anchor = self._token.open(rw=True)
            except HsmUnavailable:
                raise
            except Exception as exc:  # any failure to reach the token is "unavailable"
                self._down_since = time.monotonic()
                raise HsmUnavailable(
                    f"token {self.config.label} unavailable ({type(exc).__name__})") from None
            self._down_since = None

    def _mark_down(self) -> None:
        """Forget every session: after a token fault none of them can be trusted."""
        with self._lock:
            self._generation += 1
            while True:
                try:
                    s = self._idle.get_nowait()
                except queue.Empty:
                    break
                _quiet_close(s.raw)
            if self._anchor is not None:
                _quiet_close(self._anchor)
            self._anchor = None
            self._down_since = time.monotonic()

    def close(self) -> None:
        self._mark_down()
        self._down_since = None

    @property
    def available(self) -> bool:
        """For health checks: never queues behind a long request (busy means alive)."""
        if not self._module_lock.acquire(blocking=False):
            return self._anchor is not None
        try:
            with self.session():
                return True
        except HsmUnavailable:
            return False
        finally:
            self._module_lock.release()

    @property
    def idle(self) -> int:
        return self._idle.qsize()

    # ------------------------------------------------------------------ sessions
    @contextmanager
    def session(self) -> Iterator[Session]:
        """Borrow a session; waits at most `acquire_timeout`, then HsmUnavailable."""
        if not self._module_lock.acquire(timeout=self.config.acquire_timeout):
            raise HsmUnavailable(f"token {self.config.label}: HSM busy")
        try:
            with self._borrow() as s:
                yield s
        finally:
            self._module_lock.release()

    @contextmanager
    def _borrow(self) -> Iterator[Session]:
        self._ensure_open()
        if not self._slots.acquire(timeout=self.config.acquire_timeout):
            raise HsmUnavailable(f"token {self.config.label}: session pool exhausted")
        generation = self._generation
        s: Session | None = None
        try:
            try:
                s = self._idle.get_nowait()
            except queue.Empty:
                try:
                    s = Session(self._token.open(rw=True))
                except Exception as exc:
                    self._mark_down()
                    raise translate(exc) from None
            self.in_use += 1
            try:
                yield s
            except BROKEN_SESSION as exc:
                s.broken = True
                self._mark_down()
                raise translate(exc) from None
            except px.PKCS11Error as exc:
                raise translate(exc) from None
            finally:
                self.in_use -= 1
        finally:
            if s is not None:
                if s.broken or generation != self._generation:
                    _quiet_close(s.raw)
                else:
                    self._idle.put(s)
            self._slots.release()


def _quiet_close(raw: Any) -> None:
    try:
        raw.close()
    except Exception:
        pass
