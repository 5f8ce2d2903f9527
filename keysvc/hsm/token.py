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

Faults: when the token stops answering (its objects vanish, sessions die), the token is
marked down and every call fails fast with HsmUnavailable. After `retry_after` seconds the
next call re-initialises the module (C_Finalize + C_Initialize: the only way SoftHSM2
sees a token again) and logs in afresh, so the service heals without a restart.
"""
from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar

import pkcs11
import pkcs11.exceptions as px

from keysvc import tracing
from keysvc.hsm.direct import Calls
from keysvc.hsm.errors import BROKEN_SESSION, HsmKeyNotFound, HsmUnavailable, translate
from keysvc.hsm.store_lock import StoreBusy, StoreLock, for_token, for_tokens

T = TypeVar("T")


# Seconds a long loop's breath waits at most for a thread waiting for the module lock to
# take it.
BREATH = 0.01


class _Module:
    """A loaded PKCS#11 module: its lock, and a generation bumped by every re-initialise."""

    def __init__(self, path: str) -> None:
        # C_Initialize reads every token's own file, which another process's login rewrites
        self.tokens = for_tokens(path, timeout=15.0)
        with self.tokens.shared():
            self.lib = pkcs11.lib(path)
        self.direct = Calls(path)  # after pkcs11.lib: the module is loaded and initialised
        self.lock = threading.RLock()
        self.generation = 0
        self.waiting = 0  # threads in `acquire` (a long loop's breath lets one in)
        self._counting = threading.Lock()

    def acquire(self, timeout: float) -> bool:
        """The module lock, counted while waited for (`Token.breathe`)."""
        with self.counted():
            return self.lock.acquire(timeout=timeout)

    @contextmanager
    def counted(self) -> Iterator[None]:
        """A wait for the module lock that a long loop's breath sees (`Token.breathe`):
        also another long loop's, re-taking the lock after its own breath (review 5,
        session 18: two files could not hand over to each other)."""
        with self._counting:
            self.waiting += 1
        try:
            yield
        finally:
            with self._counting:
                self.waiting -= 1

    def reinitialize(self) -> None:
        with self.lock, self.tokens.shared():  # busy: nothing re-read, no handle void
            try:
                self.lib.reinitialize()
            finally:
                self.generation += 1


_MODULES: dict[str, _Module] = {}
_MODULES_LOCK = threading.Lock()


def _module(path: str) -> _Module:
    with _MODULES_LOCK:
        if path not in _MODULES:
            _MODULES[path] = _Module(path)
        return _MODULES[path]


@dataclass(frozen=True)
class TokenConfig:
    module: str
    label: str
    pin: str = field(repr=False)
    pool_size: int = 4
    acquire_timeout: float = 5.0
    retry_after: float = 1.0
    # A key that always exists in this token: finding it proves the token is really there.
    sentinel: str = ""


class Session:
    """A pooled PKCS#11 session with a per-session cache of key objects by label.

    Key objects in python-pkcs11 are bound to the session that found them, so the cache
    lives here; it saves a C_FindObjects round trip on every device key wrap.
    """

    def __init__(self, raw: Any, direct: Calls, store: StoreLock) -> None:
        self.raw = raw
        self.direct = direct  # the hot loops' calls on this session's handle (keysvc/hsm/direct.py)
        self.store = store    # held around token-object searches and writes (store_lock.py)
        self.keys: dict[tuple, Any] = {}
        self.broken = False
        self.retire = False

    def retire_after_use(self) -> None:
        """Close this session when it is given back: C_CloseSession destroys every session
        object made in it at once, cheaper than one C_DestroyObject per device key."""
        self.retire = True


class Token:
    def __init__(self, config: TokenConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._idle: queue.LifoQueue[Session] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(config.pool_size)
        self._module: _Module | None = None
        self._anchor: Any = None
        self._token: Any = None
        self._generation = -1          # the module generation our handles belong to
        self._down_since: float | None = None
        self.in_use = 0
        self.store = for_token(config.module, config.label, config.acquire_timeout)

    # ------------------------------------------------------------------ lifecycle
    def _mod(self) -> _Module:
        if self._module is None:
            try:
                self._module = _module(self.config.module)
            except Exception as exc:
                raise HsmUnavailable(f"cannot load PKCS#11 module ({type(exc).__name__})") \
                    from None
        return self._module

    def _ensure_open(self) -> None:
        mod = self._mod()
        with self._lock:
            if self._anchor is not None and self._generation == mod.generation:
                return
            if self._anchor is not None:       # the module was re-initialised under us
                self._drop_stale_handles()
            if self._down_since is not None:
                if time.monotonic() - self._down_since < self.config.retry_after:
                    raise HsmUnavailable(f"token {self.config.label} unavailable")
                mod.reinitialize()             # SoftHSM2 re-reads its tokens only here
                self._down_since = None        # re-read: a busy login next is not a fault
            try:
                with mod.tokens.exclusive():  # the slot list reads every token's own file,
                    self._open_anchor(mod)    # and C_Login rewrites this one's
            except StoreBusy:
                raise                         # busy, not down: no re-initialise next time
            except Exception as exc:
                self._down_since = time.monotonic()
                raise HsmUnavailable(
                    f"token {self.config.label} unavailable ({type(exc).__name__})") from None
            self._generation = mod.generation
            self._down_since = None

    def _open_anchor(self, mod: _Module) -> None:
        self._token = mod.lib.get_token(token_label=self.config.label)
        try:
            self._anchor = self._token.open(rw=True, user_pin=self.config.pin)
        except px.UserAlreadyLoggedIn:
            self._anchor = self._token.open(rw=True)

    def _drop_stale_handles(self) -> None:
        """Forget sessions of a previous module generation WITHOUT closing them: after
        C_Finalize the module numbers sessions afresh, so an old handle may now name another
        token's new session, and closing it would close that one."""
        while True:
            try:
                self._idle.get_nowait()
            except queue.Empty:
                break
        self._anchor = None

    def _forget_sessions(self) -> None:
        while True:
            try:
                s = self._idle.get_nowait()
            except queue.Empty:
                break
            _quiet_close(s.raw)
        if self._anchor is not None:
            _quiet_close(self._anchor)
        self._anchor = None

    def mark_down(self) -> None:
        """Forget every session: after a token fault none of them can be trusted."""
        with self._lock:
            if self._generation == self._mod().generation:
                self._forget_sessions()
            else:
                self._drop_stale_handles()
            self._down_since = time.monotonic()

    def close(self) -> None:
        with self._lock:
            self._forget_sessions()
            self._down_since = None
        # The store lock's files only once no thread of ours is inside a held section
        # (every one is, under the module lock): closing them would let go of the lock.
        mod = self._module
        if mod is not None and mod.lock.acquire(timeout=self.config.acquire_timeout):
            try:
                self.store.close()
            finally:
                mod.lock.release()

    def check(self) -> bool:
        """For health checks: can we borrow a session and see the sentinel key?

        Never queues behind a long request: a busy module is a live module.
        """
        mod = self._mod()
        if not mod.lock.acquire(blocking=False):
            return self._anchor is not None
        try:
            with self.session() as s:
                if self.config.sentinel:
                    try:
                        with self.store.shared(timeout=0.0):
                            s.raw.get_key(label=self.config.sentinel)
                    except StoreBusy:
                        pass  # another process is writing the token: busy is alive
            return True
        except (HsmUnavailable, HsmKeyNotFound):
            return False
        finally:
            mod.lock.release()

    @property
    def generation(self) -> int:
        """The module generation this token's object handles belong to (a re-initialise
        makes every handle found before it stale)."""
        return self._generation

    @property
    def idle(self) -> int:
        return self._idle.qsize()

    # ------------------------------------------------------------------ sessions
    @contextmanager
    def session(self, *, missing_means_down: bool = True) -> Iterator[Session]:
        """Borrow a session; waits at most `acquire_timeout`, then HsmUnavailable.

        A key object that cannot be found makes the token suspect: if its sentinel is gone
        too, the token is marked down (HsmUnavailable) - unless the caller will re-read
        the token and retry first (`run`), since a stale view hides the sentinel as well.
        """
        mod = self._mod()
        if not mod.acquire(self.config.acquire_timeout):
            raise HsmUnavailable(f"token {self.config.label}: HSM busy")
        try:
            with self._borrow(missing_means_down) as s:
                yield s
        finally:
            mod.lock.release()

    @contextmanager
    def _borrow(self, missing_means_down: bool = True) -> Iterator[Session]:
        self._ensure_open()
        if not self._slots.acquire(timeout=self.config.acquire_timeout):
            raise HsmUnavailable(f"token {self.config.label}: session pool exhausted")
        generation = self._generation
        s: Session | None = None
        try:
            try:
                s = self._idle.get_nowait()
            except queue.Empty:
                mod = self._mod()
                try:
                    with mod.tokens.shared():  # C_OpenSession reads the token's own file
                        s = Session(self._token.open(rw=True), mod.direct, self.store)
                except StoreBusy:
                    raise                      # busy, not down
                except Exception as exc:
                    self.mark_down()
                    raise translate(exc) from None
            self.in_use += 1
            try:
                yield s
            except BROKEN_SESSION as exc:
                s.broken = True
                self.mark_down()
                raise translate(exc) from None
            except (px.NoSuchKey, HsmKeyNotFound) as exc:
                # A missing object may mean the token itself is gone: ask the sentinel.
                if missing_means_down and self.config.sentinel \
                        and not self._sentinel_present(s):
                    s.broken = True
                    self.mark_down()
                    raise HsmUnavailable(f"token {self.config.label} lost its objects") \
                        from None
                raise translate(exc) from None
            except px.PKCS11Error as exc:
                raise translate(exc) from None
            finally:
                self.in_use -= 1
        finally:
            if s is not None:
                if generation != self._mod().generation:
                    pass  # a stale handle: drop it, never close it (see _drop_stale_handles)
                elif s.broken or s.retire or generation != self._generation \
                        or self._anchor is None:
                    _quiet_close(s.raw)
                else:
                    self._idle.put(s)
            self._slots.release()

    def breathe(self) -> None:
        """Let other threads reach the HSM between the steps of a long loop.

        A 64 MiB file is minutes of HSM calls at worst; holding the module lock for all of
        it would time other callers out. The loop's session and its objects stay ours -
        unless another thread re-initialised the module meanwhile (`refresh`): then every
        handle the loop holds is void and may already name another session's objects, so
        the loop must stop (HsmUnavailable; the caller may retry the whole call).
        """
        mod = self._mod()
        generation = mod.generation
        waiting = mod.waiting
        # RLock's own hand-over, as threading.Condition uses it
        state = mod.lock._release_save()  # type: ignore[attr-defined]
        try:
            # Until one of the threads waiting has the lock (at most BREATH seconds): a
            # bare yield seldom let one in on a busy machine, and the audit writer waited
            # more than its 5 s behind a 30,000-installation file, failing the small calls
            # closed (session 18, the suite).
            end = time.monotonic() + BREATH
            time.sleep(0)
            while waiting and mod.waiting >= waiting and time.monotonic() < end:
                time.sleep(0.0002)
        finally:
            with mod.counted():
                mod.lock._acquire_restore(state)  # type: ignore[attr-defined]
        if mod.generation != generation:
            raise HsmUnavailable(f"token {self.config.label} was re-read during a long "
                                 "operation; retry it")

    def run(self, work: Callable[[Session], T]) -> T:
        """`work` in a session; if it misses a key object, re-read the token and retry once.

        SoftHSM2's file store can miss objects that another process (a replica) wrote after
        this process last wrote to the token; only C_Finalize + C_Initialize makes it look
        again. Work must be side-effect free in the token until it succeeds (ours is:
        session objects are destroyed with the session).
        """
        try:
            with tracing.span("hsm.session", partition=self.config.label), \
                    self.session(missing_means_down=False) as s:
                return work(s)
        except HsmKeyNotFound:
            self.refresh()
            with self.session() as s:
                return work(s)

    def refresh(self) -> None:
        """Re-initialise the module so that it re-reads every token from its store."""
        mod = self._mod()
        if not mod.acquire(self.config.acquire_timeout):
            raise HsmUnavailable(f"token {self.config.label}: HSM busy")
        try:
            mod.reinitialize()
        finally:
            mod.lock.release()

    def _sentinel_present(self, s: Session) -> bool:
        try:
            with self.store.shared():
                s.raw.get_key(label=self.config.sentinel)
            return True
        except HsmUnavailable:
            raise  # busy (or its lock file unusable) is not lost
        except Exception:
            return False


def _quiet_close(raw: Any) -> None:
    try:
        raw.close()
    except Exception:
        pass


@contextmanager
def security_officer(module: str, label: str, so_pin: str) -> Iterator[Session]:
    """A session logged in as the token's security officer, for the one thing keysvc needs
    the SO for: marking the backup ceremony's wrapping key CKA_TRUSTED. Login state belongs
    to the process, so this must run before any user session of this token is open in this
    process (the backup command does it first); the server never does it."""
    mod = _module(module)
    store = for_token(module, label, 15.0)
    with mod.lock:
        try:
            with mod.tokens.exclusive():
                tok = mod.lib.get_token(token_label=label)
                session = tok.open(rw=True, so_pin=so_pin)
        except px.PKCS11Error as exc:
            store.close()
            raise translate(exc) from None
        try:
            yield Session(session, mod.direct, store)
        finally:
            _quiet_close(session)
            store.close()
