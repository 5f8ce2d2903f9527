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
worker has.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import sys
import time
import traceback
from typing import Callable

log = logging.getLogger("keysvc.processes")

INDEX = 0   # this process's worker index; 0 in a single-process server
COUNT = 1   # how many workers serve the port
GIVE_UP_AFTER = 3  # workers in a row that die before they are ready
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def suffix() -> str:
    """For what each worker needs its own of (an audit file, a metrics port): "" for
    worker 0, so that a single-process server names things as it always has."""
    return f"-{INDEX}" if INDEX else ""


StartWorker = Callable[[Callable[[], None]], int]


class Supervisor:
    def __init__(self, count: int, start_worker: StartWorker) -> None:
        self.count = count
        self.start_worker = start_worker
        self.children: dict[int, int] = {}   # pid -> index
        self.ready: set[int] = set()         # indexes that said they listen
        self.stopping = False
        self.failed_starts = 0
        self.codes: list[int] = []
        self._ready_r, self._ready_w = os.pipe()

    # ------------------------------------------------------------------ in the workers
    def _spawn(self, index: int) -> None:
        if self.stopping:
            return
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
            for sig in _SIGNALS:
                signal.signal(sig, signal.SIG_DFL)  # the worker's server sets its own
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            os.close(self._ready_r)
            code = self.start_worker(lambda: os.write(self._ready_w, bytes([index])))
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
        if not self._wait_ready({0}):
            return self._finish()
        for i in range(1, self.count):
            self._spawn(i)
        if not self._wait_ready(set(range(self.count))):
            return self._finish()
        announce()
        while self.children:
            pid, status = os.wait()
            index = self.children.pop(pid, None)
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                self.codes.append(code)
                continue
            log.error("worker %d (pid %d) ended with %d; starting another", index, pid, code)
            self.ready.discard(index)
            time.sleep(1)
            self._spawn(index)
            if not self._wait_ready(self.ready | {index}):
                return self._finish()
            log.info("worker %d serves again", index)
        return self._finish()

    def _wait_ready(self, wanted: set[int]) -> bool:
        """Until every index in `wanted` has said it listens; False if one died first (or
        a stop was asked for)."""
        while not wanted <= self.ready:
            if self.stopping:
                return False
            readable, _, _ = select.select([self._ready_r], [], [], 0.5)
            if readable:
                self.ready.update(os.read(self._ready_r, 64))
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid and pid in self.children:
                index = self.children.pop(pid)
                if index not in self.ready:
                    self.failed_starts += 1
                    log.error("worker %d (pid %d) ended before it was ready (%d)", index, pid,
                              os.waitstatus_to_exitcode(status))
                    if self.failed_starts >= GIVE_UP_AFTER or index == 0:
                        self._stop_all()
                        return False
                    self._spawn(index)
        self.failed_starts = 0
        return True

    def _forward(self, signum: int, _frame: object) -> None:
        if signum != signal.SIGHUP:
            self.stopping = True
        for pid in list(self.children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _stop_all(self) -> None:
        self.stopping = True
        self._forward(signal.SIGTERM, None)

    def _finish(self) -> int:
        self._stop_all()
        while self.children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            if self.children.pop(pid, None) is not None:
                self.codes.append(os.waitstatus_to_exitcode(status))
        failed = [c for c in self.codes if c != 0]
        return failed[0] if failed else (0 if self.ready else 1)


def supervise(count: int, start_worker: StartWorker, announce: Callable[[], None]) -> int:
    """Run `count` workers (each `start_worker(ready)`, which calls `ready()` once it
    listens and returns its exit code) until a signal stops them."""
    return Supervisor(count, start_worker).run(announce)
