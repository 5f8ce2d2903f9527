"""The online rewrap in a process of its own, at the lowest CPU priority.

Why not a thread of the serving process: the job is about half Python (seals, rows,
batches) and holds the interpreter lock between its HSM calls, so live calls queued behind
it for the lock. Measured with bench/bench_rewrap.py (4 clients of VerifyPrepaymentKey, the
same run each), the live calls' p99 during the job against without it: as a thread x1.95-2.29
on SQLite and x1.81-2.81 on PostgreSQL (100,000 rows), x2.18 and x3.86 (1,000,000); in its
own process at nice 19 x1.31-1.80 and x1.50-1.67 (100,000), x1.93 and x2.64 (1,000,000).

The HSM loop (unwrap, check value, wrap, seal: most of the job's CPU) runs in a thread of
its own under SCHED_IDLE: the kernel runs it only on a core nothing else wants, and a live
call that wakes preempts it at once, where a nice-19 thread keeps its slice. On PostgreSQL,
300,000 rows, two runs each: nice 19 2,902 and 2,987 rows/s, p99 during 57.8 and 58.6 ms;
SCHED_IDLE 3,178 and 3,197 rows/s, 50.4 and 59.0 ms. The rest (reading rows, the batch's
transaction, audit events) stays at nice 19: a thread that holds a database lock (SQLite's
one writer lock) must not be starved by a busy machine while live calls wait on that lock.
The HSM thread holds no lock another process waits for, but one step removed it could:
it holds this process's PKCS#11 module lock, and this process's audit writer takes the
database's writer lock (or the chain head's row lock) before it asks for the module. So a
batch goes to the HSM thread only once the audit writer is idle; while the HSM thread
works, nothing else in this process writes audit events (the main thread waits for it).
SoftHSM2's own file locks, taken for microseconds when a token object is read, are the
one lock it may hold that another process could want. An unprivileged thread cannot
leave SCHED_IDLE, hence two threads.

The child is spawned (never forked: PKCS#11 sessions and database connections do not
survive a fork), opens the same state as a replica does, logs in with the same PINs
(handed over in the spawn pipe, never in the environment), hardens itself like the
server, and dies with its parent (PR_SET_PDEATHSIG). Its progress reaches the parent in
shared memory, for `rewrap status` and the parent's metrics. A child that dies is started
again after a pause; the rows are the checkpoint, so nothing is lost or done twice.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
from dataclasses import replace
from typing import Any, Callable, TypeVar

from keysvc.custody.rewrap import DONE, REMAINING, Rewrap

log = logging.getLogger("keysvc.custody.rewrap")
T = TypeVar("T")

RESTART_AFTER = 5.0  # seconds before a child that died is started again
HANDSHAKE_SECONDS = 60.0  # a child that has not asked for its PINs by then is left to die
PIN_PARTITIONS = ("s1sp", "dco", "admin")
# shared progress per partition: done, rows per second, flagged rows, remaining rows
DONE_AT, RATE_AT, FLAGGED_AT, REMAINING_AT = range(4)


class SharedProgress:
    """One partition's progress as the parent reads it (the fields of rewrap.Progress that
    `rotation.status` shows)."""

    def __init__(self, values: Any) -> None:
        self.values = values

    @property
    def done(self) -> int:
        return int(self.values[DONE_AT])

    @property
    def rows_per_second(self) -> float:
        return float(self.values[RATE_AT])

    @property
    def flagged(self) -> int:
        return int(self.values[FLAGGED_AT])


class RewrapProcess:
    """The parent's handle on the child: start, watch (restart, metrics), stop."""

    def __init__(self, settings: Any, rate: float, batch: int) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        # The PINs are not in what the spawn hands over (the child unpickles that before it
        # can harden itself): they follow in a pipe once the child says it is hardened.
        self._pins = {f"{p}_pin": getattr(settings, f"{p}_pin") for p in PIN_PARTITIONS}
        self._settings = replace(settings, certificate_workers=0, processes=1,
                                 **{k: "" for k in self._pins})
        self._rate, self._batch = rate, batch
        self._shared = {p: self._ctx.Array("d", 4, lock=False) for p in Rewrap.PARTITIONS}
        self.progress = {p: SharedProgress(v) for p, v in self._shared.items()}
        self._proc: Any = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._reported = {p: 0 for p in Rewrap.PARTITIONS}

    def start(self) -> None:
        threading.Thread(target=self._watch, name="rewrap-watch", daemon=True).start()

    def _spawn(self) -> None:
        ours, theirs = self._ctx.Pipe()
        with self._lock:  # never a child started after stop() looked
            if self._stop.is_set():
                return
            self._proc = self._ctx.Process(
                target=child_main, name="keysvc-rewrap", daemon=True,
                args=(self._settings, self._rate, self._batch, self._shared, os.getpid(),
                      theirs))
            self._proc.start()
        theirs.close()
        try:
            if ours.poll(HANDSHAKE_SECONDS) and ours.recv() == "hardened":
                ours.send(self._pins)
        except (EOFError, OSError):
            pass  # it died before asking: the watch starts it again
        finally:
            ours.close()

    def _watch(self) -> None:
        self._spawn()
        while not self._stop.wait(1.0):
            for p, values in self._shared.items():
                REMAINING.labels(p).set(values[REMAINING_AT])
                done = int(values[DONE_AT])
                if done > self._reported[p]:
                    DONE.labels(p).inc(done - self._reported[p])
                self._reported[p] = done
            if self._proc is not None and not self._proc.is_alive() \
                    and not self._stop.is_set():
                log.warning("the rewrap process ended (exit code %s); starting it again in "
                            "%.0f s", self._proc.exitcode, RESTART_AFTER)
                if not self._stop.wait(RESTART_AFTER):
                    self._spawn()

    def stop(self) -> None:
        with self._lock:
            self._stop.set()
            proc = self._proc
        if proc is None:
            return
        proc.terminate()  # SIGTERM: the batch in flight ends, then the job
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


class IdleThread:
    """Runs functions in one thread under SCHED_IDLE (see above); the caller waits. A batch
    starts only once `quiet` returns (this process's audit writer idle)."""

    def __init__(self, quiet: Callable[[], bool] = lambda: True) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._quiet = quiet
        self._thread = self._start()

    def _start(self) -> threading.Thread:
        thread = threading.Thread(target=self._serve, name="rewrap-hsm", daemon=True)
        thread.start()
        return thread

    def _serve(self) -> None:
        try:  # this thread only (Linux: the policy is per thread)
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError) as exc:  # not Linux, or refused: nice 19 stays
            log.info("rewrap HSM thread at nice 19 (SCHED_IDLE refused: %s)",
                     type(exc).__name__)
        while True:
            fn, done = self._jobs.get()
            try:
                done.put((True, fn()))
            except BaseException as exc:
                done.put((False, exc))

    def __call__(self, fn: Callable[[], T]) -> T:
        if not self._thread.is_alive():  # it died (with an earlier batch)
            self._jobs = queue.Queue()  # a batch it left is not run later by its successor
            self._thread = self._start()
        if not self._quiet():
            raise RuntimeError("this process's audit writer is still writing (the database "
                               "or a sink is slow); the batch waits")
        done: queue.Queue = queue.Queue(maxsize=1)
        self._jobs.put((fn, done))
        while True:
            try:
                ok, value = done.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():  # the batch is lost, not the job
                    raise RuntimeError("the rewrap's HSM thread ended") from None
        if not ok:
            raise value
        return value


def child_main(settings: Any, rate: float, batch: int, shared: dict[str, Any],
               parent: int, pins: Any) -> None:
    """The child: hardened, lowest priority, the job until SIGTERM or its parent's end. It
    asks for the PINs only once it is hardened (not dumpable, no core, private files)."""
    from keysvc import hardening
    hardening.harden_early()
    from keysvc.observability import configure_logging
    from keysvc.processes import die_with_parent
    configure_logging(settings.log_level)
    hardening.harden(settings.lock_memory)
    die_with_parent(parent)
    _name(b"keysvc-rewrap")  # what ps and /proc/PID/comm show
    os.nice(19)
    pins.send("hardened")
    settings = replace(settings, **pins.recv())
    pins.close()
    from keysvc.app import App
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides (^C reaches both)
    app = App.open(settings, helper=True)  # a SIGTERM meanwhile ends it at once
    job_stop = threading.Event()
    # The batch in flight ends. Set from a thread: Event.set inside a signal handler can
    # deadlock on the Event's own lock if the signal lands inside Event.wait.
    signal.signal(signal.SIGTERM,
                  lambda *_: threading.Thread(target=job_stop.set, daemon=True).start())
    try:
        Rewrap(app, rate, batch, shared=shared,
               hsm_loop=IdleThread(app.audit.writer.wait_idle)).run(job_stop)
    finally:
        app.close()


def _name(name: bytes) -> None:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(15, name, 0, 0, 0)  # PR_SET_NAME
