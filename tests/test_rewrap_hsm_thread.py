"""The rewrap process's HSM thread (keysvc/custody/rewrap_process.py `IdleThread`): only it
runs SCHED_IDLE; what it runs returns or raises to the caller unchanged; a SIGTERM while the
caller waits is handled at once; a thread that is gone is an error, not a hang; and a batch
starts only when this process's audit writer is idle (the writer holds the database's
writer lock while it waits for the module lock the starved thread would hold).
(From the independent review of session 9.)"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from keysvc.audit import writer as w
from keysvc.audit.chain import AuditEvent
from keysvc.custody.rewrap_process import IdleThread
from keysvc.errors import Unavailable

ROOT = Path(__file__).resolve().parent.parent


def _policy_of_thread(native_id: int) -> int:
    stat = open(f"/proc/self/task/{native_id}/stat").read()
    return int(stat.rsplit(")", 1)[1].split()[38])


def test_the_value_and_every_exception_reach_the_caller_unchanged():
    from keysvc.errors import KeysvcError, error
    from keysvc.hsm import HsmError
    from keysvc.hsm.errors import HsmUnavailable
    idle = IdleThread()
    assert idle(lambda: 42) == 42
    for exc in (HsmUnavailable("token down"), error("RECORD_SEAL_INVALID", "x"),
                ValueError("v"), SystemExit(3), KeyboardInterrupt(), GeneratorExit()):
        def boom(exc=exc):
            raise exc
        with pytest.raises(BaseException) as got:
            idle(boom)
        assert got.value is exc
    assert isinstance(HsmUnavailable("x"), HsmError)
    assert isinstance(error("RECORD_SEAL_INVALID", "x"), KeysvcError)
    assert idle(lambda: "still serving") == "still serving"  # the thread survived them


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux only")
def test_only_the_serving_thread_is_sched_idle():
    idle = IdleThread()
    inside = idle(threading.get_native_id)
    assert inside != threading.get_native_id()
    assert _policy_of_thread(inside) == os.SCHED_IDLE
    assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the caller (main thread) is not


_SIGTERM_CHILD = textwrap.dedent("""
    import signal, sys, threading, time
    sys.path.insert(0, %r)
    from keysvc.custody.rewrap_process import IdleThread
    stop, seen = threading.Event(), []
    signal.signal(signal.SIGTERM, lambda *_: (seen.append(time.monotonic()), stop.set()))
    idle = IdleThread()
    print("ready", flush=True)
    t0 = time.monotonic()
    out = idle(lambda: (time.sleep(2.0), "batch done")[1])
    print("result", out, "handler_after", round(seen[0] - t0, 2) if seen else None,
          "returned_after", round(time.monotonic() - t0, 2), flush=True)
""") % str(ROOT)


def test_sigterm_while_the_caller_waits_runs_its_handler_and_the_batch_still_ends():
    proc = subprocess.Popen([sys.executable, "-c", _SIGTERM_CHILD], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    proc.terminate()
    out = proc.stdout.read()
    assert proc.wait(10) == 0
    words = out.split()
    assert words[:3] == ["result", "batch", "done"], out
    handler_after, returned_after = float(words[4]), float(words[6])
    assert handler_after < 1.0     # not delayed until the batch ends: no deadlock
    assert returned_after >= 1.9   # the batch in flight ends (as documented)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_hsm_thread_that_dies_in_a_batch_is_an_error_not_a_hang(monkeypatch):
    import queue

    from keysvc.custody import rewrap_process
    idle = IdleThread()
    assert idle(lambda: 1) == 1

    class Dropping(queue.Queue):  # the hand-over of the result fails, twice: the thread dies
        def put(self, item, block=True, timeout=None):
            raise MemoryError("simulated")
    monkeypatch.setattr(rewrap_process.queue, "Queue", Dropping)
    try:
        with pytest.raises(RuntimeError, match="HSM thread ended"):
            idle(lambda: 2)
    finally:
        monkeypatch.undo()
    assert idle(lambda: "again") == "again"  # the next batch has a thread again


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_hsm_thread_before_a_batch_is_replaced():
    idle = IdleThread()
    assert idle(lambda: 1) == 1

    class Poisoned:  # a hand-over that fails twice kills the serving thread
        def put(self, item):
            raise MemoryError("simulated")
    idle._jobs.put((lambda: None, Poisoned()))
    time.sleep(0.2)
    assert idle(lambda: "new thread") == "new thread"



def test_a_batch_starts_only_once_this_process_audit_writer_is_idle(app):
    writer = app.audit.writer
    writer.busy_since = time.monotonic()  # a batch being written (its transaction open)
    started: list[float] = []
    idle = IdleThread(writer.wait_idle)
    t = threading.Thread(target=lambda: idle(lambda: started.append(time.monotonic())),
                         daemon=True)
    t.start()
    time.sleep(0.5)
    assert not started, "the HSM batch started while the audit writer was busy"
    writer.busy_since = None
    t.join(5)
    assert started


def _writer(timeout: float) -> w.AuditWriter:
    return w.AuditWriter(store=None, token=None, anchor=lambda: None, sinks=lambda: [],
                         timeout=timeout)


def _event() -> AuditEvent:
    import datetime as dt
    return AuditEvent(id="e1", time=dt.datetime.now(dt.timezone.utc), actor="keysvc",
                      role="", action="x", target="", outcome="OK", code="")


def test_wait_idle_does_not_return_between_the_writers_get_and_busy_since(monkeypatch):
    """The writer has taken a batch (queue empty) but not yet set busy_since: wait_idle
    must not call that idle. Made deterministic by holding the writer in AUDIT_LAG.set,
    the first call after queue.get in `_run`."""
    writer = _writer(timeout=2.0)
    in_window, leave = threading.Event(), threading.Event()

    class Lag:
        def set(self, _v):
            if threading.current_thread().name == "audit-writer":  # _run, after get
                in_window.set()
                leave.wait(5)
    monkeypatch.setattr(w, "AUDIT_LAG", Lag())
    monkeypatch.setattr(writer, "_batch", lambda batch: None)
    def submit() -> None:
        with contextlib.suppress(Unavailable):  # the batch never ends: its caller times out
            writer.submit([_event()])
    t = threading.Thread(target=submit, daemon=True)
    t.start()
    assert in_window.wait(5)
    t0 = time.monotonic()
    writer.wait_idle()
    waited = time.monotonic() - t0
    leave.set()
    t.join(5)
    assert waited > 0.2, "wait_idle called the writer idle while it held a taken batch"


def test_an_hsm_batch_does_not_start_when_wait_idle_gives_up():
    """A writer busy longer than its timeout (a stalled database or sink): the batch is
    refused (the job pauses and tries again), not started beside it."""
    writer = _writer(timeout=0.3)
    writer.busy_since = time.monotonic()
    idle = IdleThread(writer.wait_idle)
    started: list[float] = []
    with pytest.raises(RuntimeError, match="audit writer is still writing"):
        idle(lambda: started.append(time.monotonic()))
    assert not started, "the HSM batch started while the audit writer was still busy"
