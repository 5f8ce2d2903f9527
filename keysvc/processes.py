"""Several server processes behind one port: every core (issue 18).

Why processes, not threads: one process uses about one core. The GIL is the first limit;
the second is the PKCS#11 module, which python-pkcs11 initialises without OS locking, so a
process makes one HSM call at a time (`hsm.Token` holds a lock around each). A worker
process has its own interpreter, its own C_Initialize and HSM sessions, its own database
connections and its own audit writer; the workers share the tokens, the database and the one
audit chain exactly as replicas on several hosts do (tests/test_replicas.py).

Why fork here, before anything is opened: PKCS#11 sessions, gRPC servers and database
connections do not survive a fork, so the supervisor forks before it opens any, and each
worker opens its own. Worker 0 starts alone and is ready before the others start, so that
a first start (a new token's keys, the database's migrations) runs once.

One port: every worker listens on the same address with SO_REUSEPORT, and the kernel
spreads new connections over them. A connection stays with its worker (gRPC multiplexes a
channel's calls on one connection), so load spreads by connections: clients that share one
channel share one worker.

The supervisor holds no key, no session and no connection. It forwards SIGTERM, SIGINT and
SIGHUP, replaces a worker that dies (one that dies before it is ready three times running
stops the service: that is a configuration error, not bad luck), and exits when every
worker has. It tells systemd's watchdog only while every ready worker beats (`beat`, from
its event loop), and kills and replaces one that has not for STALE_AFTER seconds: told
blindly, a frozen worker kept its share of the port's connections, and 7 of 8 new ones
timed out (review, session 17).
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import select
import signal
import struct
import sys
import time
import traceback
from typing import Callable

from keysvc import notify

log = logging.getLogger("keysvc.processes")

INDEX = 0   # this process's worker index; 0 in a single-process server
COUNT = 1   # how many workers serve the port
GIVE_UP_AFTER = 3  # workers in a row that die before they are ready
STOP_GRACE = 45.0  # seconds a stopping worker has (it drains calls for 40) before SIGKILL
STALE_AFTER = 30.0  # seconds without a beat after which a ready worker is replaced (or
#                    systemd's WatchdogSec, when shorter)
START_WITHIN = 120.0  # seconds a replacement worker has to be ready (or twice the silence
#                     allowed by systemd's WatchdogSec, at least 10 s), else started again
SLOW_START_BACKOFF_MAX = 60.0  # seconds at most between such starts
BEATS: mmap.mmap | None = None  # each worker's last beat (CLOCK_MONOTONIC), shared


def beat() -> None:
    """This worker is alive: its event loop and its health thread go round (server.py)."""
    if BEATS is not None:
        struct.pack_into("d", BEATS, 8 * INDEX, time.monotonic())


def _last_beat(index: int) -> float:
    assert BEATS is not None
    return struct.unpack_from("d", BEATS, 8 * index)[0]
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


StartWorker = Callable[[Callable[[], None]], int]


class Supervisor:
    def __init__(self, count: int, start_worker: StartWorker) -> None:
        self.count = count
        self.start_worker = start_worker
        self.children: dict[int, int] = {}   # pid -> index
        self.ready: set[int] = set()         # indexes that said they listen
        self.respawn: dict[int, float] = {}  # index -> when to start it again
        self.stopping = False
        self.started = False                 # every worker has been ready once
        self.failed_starts = 0
        self.slow_starts: dict[int, int] = {}  # index -> its starts killed in a row as slow
        self._slow_pids: set[int] = set()      # workers killed as too slow to start
        self.codes: list[int] = []
        self._ready_r, self._ready_w = os.pipe()
        self._pid = os.getpid()
        interval = notify.watchdog_interval()  # (half of WatchdogSec)
        # (never under 5 s: a worker beats every second, and a busy core delays a beat)
        self.stale_after = max(5.0, min(STALE_AFTER, 2 * interval)) if interval \
            else STALE_AFTER
        self.start_within = max(10.0, min(START_WITHIN, 2 * self.stale_after)) if interval \
            else START_WITHIN
        global BEATS
        BEATS = self.beats = mmap.mmap(-1, 8 * count)  # (anonymous, shared with the workers)

    # ------------------------------------------------------------------ in the workers
    def _spawn(self, index: int) -> None:
        if self.stopping:
            return
        struct.pack_into("d", self.beats, 8 * index, time.monotonic())  # (a start: no silence)
        # Signals wait while the child is between fork and its own handlers: a SIGTERM in
        # that window would otherwise run the supervisor's handler in the child.
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        pid = os.fork()
        if pid:
            self.children[pid] = index
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            return
        code = 1
        try:
            global INDEX, COUNT
            INDEX, COUNT = index, self.count
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the worker's server sets its own
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)   # (a CRL reload before it serves)
            die_with_parent(self._pid)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            os.close(self._ready_r)
            def ready() -> None:
                beat()  # (before it says so: a start longer than the silence allowed is no
                #          silence; review, session 17)
                os.write(self._ready_w, bytes([index]))
            code = self.start_worker(ready)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    # ------------------------------------------------------------------ in the supervisor
    def run(self, announce: Callable[[], None]) -> int:
        for sig in _SIGNALS:
            signal.signal(sig, self._forward)
        self._spawn(0)
        watchdog = notify.Watchdog()  # the supervisor is systemd's main process
        while not self.stopping:
            if self._all_beat():
                watchdog.tick()
            readable, _, _ = select.select([self._ready_r], [], [], 0.2)
            if readable:
                for index in os.read(self._ready_r, 64):
                    self.ready.add(index)
                    if self.slow_starts.pop(index, None):
                        self._tell_starts()
                    struct.pack_into("d", self.beats, 8 * index, time.monotonic())
                    self.failed_starts = 0
                    if self.started:
                        log.info("worker %d serves again", index)
            self._reap()
            if not self.started:
                if 0 in self.ready and len(self.children) == 1 and self.count > 1 \
                        and not self.respawn:
                    for i in range(1, self.count):
                        self._spawn(i)
                if self.ready >= set(range(self.count)):
                    self.started = True
                    announce()
            for index, at in list(self.respawn.items()):
                if time.monotonic() >= at:
                    del self.respawn[index]
                    self._spawn(index)
        return self._finish()

    def _all_beat(self) -> bool:
        """Every ready worker beat within `stale_after`; one that did not is killed (and
        replaced by `_reap`). So is a replacement still not ready `start_within` after it
        started, and started again after a while: one hung before it listened held its
        place for good, unseen, while the watchdog was told all was well (review, session
        17). (The first start is systemd's TimeoutStartSec's: READY=1 waits for it.)"""
        fresh = True
        for pid, index in list(self.children.items()):
            silent = time.monotonic() - _last_beat(index)
            if index in self.ready and silent > self.stale_after:
                log.error("worker %d (pid %d) has not beaten for %.0f s; killed", index, pid,
                          silent)
            elif index not in self.ready and self.started and silent > self.start_within:
                log.error("worker %d (pid %d) not ready %.0f s after it started; killed",
                          index, pid, silent)
                self._slow_pids.add(pid)
            else:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            struct.pack_into("d", self.beats, 8 * index, time.monotonic())  # (once)
            fresh = False
        return fresh

    def _reap(self) -> None:
        """Every worker that has ended since the last look: replaced, or (three that die
        before they are ready in a row, or worker 0 at the first start) the end."""
        while self.children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if not pid:
                return
            index = self.children.pop(pid, None)
            if index is None:
                continue
            code = _exit_code(status)
            if self.stopping:  # (one killed as slow to start ends as it should, as in _finish)
                self.codes.append(0 if pid in self._slow_pids else code)
                continue
            was_ready = index in self.ready
            self.ready.discard(index)
            if pid in self._slow_pids:
                # Slow is not broken: a start may wait in line for the start lock (another
                # replica's migrations, say). The service goes on with the workers that
                # serve, and tries again later each time, never stopping them (review,
                # session 18: three slow starts stopped the workers that served).
                self._slow_pids.discard(pid)
                n = self.slow_starts[index] = self.slow_starts.get(index, 0) + 1
                # Never stopping the service for it (the restart would wait in the same
                # line: one worker short became none; review 3), but never unseen either
                # (review 2): `systemctl status` says so until the worker serves.
                self._tell_starts()
                self.respawn[index] = time.monotonic() + min(SLOW_START_BACKOFF_MAX,
                                                             2.0 ** (n - 1))
                continue
            if not was_ready:
                self.failed_starts += 1
                if self.failed_starts >= GIVE_UP_AFTER or (index == 0 and not self.started):
                    log.error("worker %d (pid %d) ended before it was ready (%d); stopping",
                              index, pid, code)
                    self.codes.append(code or 1)
                    self._stop_all()
                    return
            log.error("worker %d (pid %d) ended with %d; starting another", index, pid, code)
            self.respawn[index] = time.monotonic() + 1.0

    def _tell_starts(self) -> None:
        """STATUS= for `systemctl status`: the workers slow to start, or none."""
        slow = "; ".join(f"worker {i} not ready in {self.start_within:g} s {n} times running"
                         for i, n in sorted(self.slow_starts.items()))
        notify.notify(f"STATUS={slow}; serving with the others" if slow
                      else f"STATUS=all {self.count} workers serve")

    def _forward(self, signum: int, _frame: object) -> None:
        if signum != signal.SIGHUP:
            self.stopping = True
            notify.notify("STOPPING=1", "STATUS=draining in-flight calls")
        for pid in list(self.children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _stop_all(self) -> None:
        self.stopping = True
        self._forward(signal.SIGTERM, None)

    def _finish(self) -> int:
        """Every worker told to stop, and waited for; one still there after STOP_GRACE
        (its calls drain for 30 s) is killed."""
        self._stop_all()
        deadline = time.monotonic() + STOP_GRACE
        while self.children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid:
                if self.children.pop(pid, None) is not None:
                    self.codes.append(0 if pid in self._slow_pids else _exit_code(status))
                continue
            if time.monotonic() > deadline:
                for pid in list(self.children):
                    log.error("worker %d (pid %d) did not stop; killed", self.children[pid],
                              pid)
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                deadline = float("inf")
            time.sleep(0.05)
        failed = [c for c in self.codes if c != 0]
        return failed[0] if failed else (0 if self.started else 1)


def _exit_code(status: int) -> int:
    """As a shell has it: 128 + the signal for a worker killed by one."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def die_with_parent(parent: int) -> None:
    """A worker whose supervisor is killed (SIGKILL: it cannot pass anything on) is sent
    SIGTERM, instead of serving on alone, unsupervised, on the port."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def supervise(count: int, start_worker: StartWorker, announce: Callable[[], None]) -> int:
    """Run `count` workers (each `start_worker(ready)`, which calls `ready()` once it
    listens and returns its exit code) until a signal stops them."""
    return Supervisor(count, start_worker).run(announce)
