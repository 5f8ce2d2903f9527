"""Group commit: one thread chains the events of every call that arrives together.

A call hands its events to the writer and waits. The writer takes everything queued, and
for the whole batch: one database transaction (chain, head, intents deleted, read back), one
HSM session for the MACs, one anchor in the token, one write (fsync) per sink; then it wakes
the callers. A call waits at most `timeout` seconds, then fails closed (AUDIT_UNAVAILABLE);
the writer itself never holds a call longer than that, whatever the database or a sink does.

What the database says is checked before it is built on: the chain's head must not be
behind the HSM anchor nor differ from it at the anchor's sequence (read afresh for every
batch: another replica may have moved it), and rows copied into a sink to fill a gap must
carry their hash, link and MAC.
"""
from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import queue
import threading
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import DBAPIError

from keysvc import store as st
from keysvc.audit.anchor import MAX_SEQ, Anchor, ChainAnchor, ChainRefused
from keysvc.audit.chain import GENESIS, AuditEvent, Chained, canonical, line, row_chained
from keysvc.audit.sinks import SinkError
from keysvc.custody.versions import MacKeys, made_here, newest_named, see
from keysvc.custody.versions import label as version_label
from keysvc.errors import error
from keysvc.hsm import HsmError
from keysvc.hsm import keys as hk
from keysvc.observability import (
    AUDIT_ANCHORS,
    AUDIT_BATCH,
    AUDIT_FAILURES,
    AUDIT_LAG,
    AUDIT_SINK_LAG,
)
from keysvc.partitions import AUDIT_MAC_KEY

log = logging.getLogger("keysvc.audit.writer")

MAX_BATCH = 512
# Events that could not be chained (the database or the HSM failed) are tried again with
# the next batch, so that the chain catches up with the sink; at most this many are kept.
MAX_RETRY = 10_000
NOT_RETRIED = ("audit.probe",)
MAC_KEYS_FRESH = 1.0  # seconds the audit-mac versions found in the token are kept


# The statements of every batch, built once: building a statement and its cache key costs
# about 120 us in SQLAlchemy, running a built one about 40 us, and a batch runs nine of them
# (measured in-process: a batch of one event went from 4.6 to 3.5 ms of CPU).
_E, _H = st.audit_events.c, st.audit_head.c
_HEAD_FOR_UPDATE = select(st.audit_head).where(_H.id == 1).with_for_update()
_HASH_AT = select(_E.hash).where(_E.seq == bindparam("at"))
_MAC_AT = select(_E.mac).where(_E.seq == bindparam("at"))
_FROM_HEAD = select(_E.seq, _E.hash).where(_E.seq >= bindparam("at")).order_by(_E.seq).limit(2)
_BETWEEN = select(_E.seq, _E.hash).where(_E.seq >= bindparam("first"),
                                         _E.seq <= bindparam("last"))
_HEAD_NOW = select(_H.seq, _H.hash)
_INSERT = st.audit_events.insert()
_MOVE_HEAD = update(st.audit_head).where(_H.id == 1).values(
    seq=bindparam("new_seq"), hash=bindparam("new_hash"))


class AfterCommit(Exception):
    """The batch is chained in the database, but its anchor or a sink failed: the callers
    fail closed, and the events are not chained again (the sinks catch up from the chain)."""


@dataclass
class Pending:
    events: list[AuditEvent]
    intents: bool = False          # the events are intents already committed with an effect
    alone: bool = False            # a recovery batch: never mixed with live calls' events
    intent_ids: list[str] | None = None  # the intent rows to delete (default: event ids)
    done: threading.Event = field(default_factory=threading.Event)
    chained: list[AuditEvent] = field(default_factory=list)
    failure: str = ""
    cancelled: bool = False
    then: Callable[[], object] | None = None  # called by the writer once `done` is set


class Work:
    """One call counted as at work by `AuditWriter.working`, until `done` (once); or, not
    `counted`, one no batch waits for."""

    def __init__(self, writer: "AuditWriter", counted: bool = True) -> None:
        self._writer, self._open = writer, counted

    def done(self) -> None:
        if self._open:
            self._open = False
            self._writer._left()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Not counted while the call itself waits for a batch (an event of its own it
        chains before its end, `submit`): the batch would otherwise wait its whole delay for
        the very call that waits for it."""
        if not self._open:
            yield
            return
        self._writer._left()
        try:
            yield
        finally:
            self._writer._entered()

    def __enter__(self) -> "Work":
        return self

    def __exit__(self, *_: object) -> None:
        self.done()


# The call at work in this context (keysvc/server.py sets it for the call's work).
at_work: contextvars.ContextVar[Work | None] = contextvars.ContextVar("at_work", default=None)


class AuditWriter:
    def __init__(self, store: st.Store, token: Any, anchor: Callable[[], ChainAnchor],
                 sinks: Callable[[], list], timeout: float, commit_delay: float = 0.0) -> None:
        self.store, self.token = store, token
        self._anchor, self._sinks = anchor, sinks
        self.timeout = timeout
        self.commit_delay = commit_delay
        self._working = 0  # calls of this process at their work: their events are to come
        self._work = threading.Condition()
        self.batches = 0  # batches written (or failed), for the tests and benchmarks
        self._queue: queue.Queue[Pending] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition()
        self._in_flight = 0  # events submitted whose callers are not woken yet (wait_idle)
        self.failing_since: float | None = None
        self.busy_since: float | None = None   # when the batch being written was taken
        self._retry: list[AuditEvent] = []
        self._unchained_written: set[str] = set()
        self._mac_primary = 1  # the newest audit-mac version this process's token showed
        self._keys: MacKeys | None = None  # kept for MAC_KEYS_FRESH seconds (_mac_keys)
        self._keys_mark: tuple[int, int] = (-1, -1)
        self._keys_at = 0.0
        # The highest anchor seen in the token: read at the first batch, then learnt from
        # each batch's own anchor write (which sees every anchor of the label).
        self._known: Anchor | None = None
        self._known_read = False
        self._verified: set[Anchor] = set()  # anchors matched against the chain already
        self._wrong: list[Anchor] = []  # anchors the chain did not hold at the last batch

    # ------------------------------------------------------------------ callers' side
    def submit(self, events: list[AuditEvent], *, intents: bool = False,
               alone: bool = False, intent_ids: list[str] | None = None,
               work: Work | None = None) -> list[AuditEvent]:
        """Chain `events`; returns them with their sequences, or raises AUDIT_UNAVAILABLE.
        `work`: the call whose events these are, counted as at work until they are queued
        (not after: a batch woken by the last call at work must find its event)."""
        mine = at_work.get()
        with mine.waiting() if mine is not None and work is None else nullcontext():
            p = self._enqueue(Pending(list(events), intents, alone, intent_ids=intent_ids),
                              work)
            if not p.done.wait(self.timeout):
                self._gave_up(p)
        return self._answer(p)

    async def submit_async(self, events: list[AuditEvent], *, intents: bool = False,
                           work: Work | None = None) -> list[AuditEvent]:
        """`submit` for a call served by an event loop (keysvc/server.py): the loop goes on
        serving while the batch is written, and no thread is held waiting."""
        loop = asyncio.get_running_loop()
        settled = loop.create_future()

        def settle() -> None:
            if not settled.done():
                settled.set_result(None)
        p = self._enqueue(Pending(list(events), intents,
                                  then=lambda: loop.call_soon_threadsafe(settle)), work)
        try:
            await asyncio.wait_for(settled, self.timeout)
        except asyncio.TimeoutError:
            self._gave_up(p)
        return self._answer(p)

    def _enqueue(self, p: Pending, work: Work | None = None) -> Pending:
        if st.in_write_tx():
            raise RuntimeError("an audit event is waited for inside a write transaction")
        self._start()
        with self._idle:
            self._in_flight += 1
        self._queue.put(p)
        if work is not None:
            work.done()
        AUDIT_LAG.set(self._queue.qsize())
        return p

    def working(self, counted: bool = True) -> Work:
        """A call at its work: its event is to come (keysvc/server.py). While any is, a
        batch waits for them (`_wait_for_working`); the call stops counting once its event
        is queued (`submit`'s `work`), or when it ends without one. Not `counted`: a call
        whose work takes seconds to minutes (a migration file, a verification of the
        trail), which every batch meanwhile would wait its whole delay for (review 2,
        session 18)."""
        if counted:
            self._entered()
        return Work(self, counted)

    def _entered(self) -> None:
        with self._work:
            self._working += 1

    def _left(self) -> None:
        with self._work:
            self._working -= 1
            if not self._working:
                self._work.notify_all()

    def _wait_for_working(self) -> None:
        """Group commit, as PostgreSQL's commit_delay with commit_siblings: while calls of
        this process are still at their work, the batch waits for their events, at most
        `commit_delay` seconds. A batch costs about 2.8 ms of CPU however few events it
        holds, and 0.2 ms more an event (measured in-process), and each is a round of
        hand-overs between the writer's thread and the event loop: under load, fewer and
        larger batches leave the calls more of the machine (bench/bench_cores.py). A lone
        call waits for nothing: no other is at work."""
        if self.commit_delay <= 0:
            return
        with self._work:
            self._work.wait_for(lambda: not self._working, self.commit_delay)

    def _gave_up(self, p: Pending) -> None:
        p.cancelled = True
        AUDIT_FAILURES.labels("timeout").inc()
        raise error("AUDIT_UNAVAILABLE", f"the audit trail did not take the event within "
                                         f"{self.timeout:g} s; nothing is returned")

    @staticmethod
    def _answer(p: Pending) -> list[AuditEvent]:
        if p.failure:
            raise error("AUDIT_UNAVAILABLE", p.failure)
        return p.chained

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, daemon=True,
                                                    name="audit-writer")
                    self._thread.start()

    def wait_idle(self) -> bool:
        """Whether no event is waiting, taken or being written, within `timeout` seconds:
        the rewrap process hands its HSM loop to a starved thread only then
        (keysvc/custody/rewrap_process.py). Counted from `submit` to the caller woken,
        so the moment between the writer taking a batch and writing it counts too."""
        with self._idle:
            return self._idle.wait_for(
                lambda: self._in_flight == 0 and self.busy_since is None, self.timeout)

    def healthy(self) -> bool:
        """False while the last batch failed, or the one being written has taken longer
        than a caller waits (a stalled database or sink)."""
        busy = self.busy_since
        return self.failing_since is None and (
            busy is None or time.monotonic() - busy < self.timeout)

    # ------------------------------------------------------------------ writer's side
    def _run(self) -> None:
        while True:
            taken = [self._queue.get()]
            self._wait_for_working()
            while len(taken) < MAX_BATCH:
                try:
                    taken.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            AUDIT_LAG.set(self._queue.qsize())
            # A call that gave up before its (read-only) event was taken is not chained:
            # it returned nothing. An intent is chained whatever: its effect committed.
            live = [p for p in taken if not p.alone and (p.intents or not p.cancelled)]
            if self._retry:
                live.insert(0, Pending(self._retry))
                self._retry = []
            for batch in [live] + [[p] for p in taken if p.alone]:
                if batch:
                    self._batch(batch)
            for p in taken:
                p.done.set()
                if p.then is not None:
                    try:  # (a loop already closed, at the end of a stop)
                        p.then()
                    except RuntimeError:
                        pass
            with self._idle:
                self._in_flight -= len(taken)
                self._idle.notify_all()

    def _batch(self, batch: list[Pending]) -> None:
        self.busy_since = time.monotonic()
        self.batches += 1
        try:
            self._write(batch)
            self.failing_since = None
        except Exception as exc:  # every caller of the batch fails closed, told why
            cause = exc.__cause__ if isinstance(exc, AfterCommit) and exc.__cause__ else exc
            why = str(cause) if isinstance(cause, (ChainRefused, SinkError)) else \
                f"the audit trail cannot be written ({type(cause).__name__})"
            # HSM errors carry return-code names only; anything else is named by where it
            # was raised (file and line, never a value).
            frames = traceback.extract_tb(cause.__traceback__)
            detail = str(cause)[:120] if isinstance(cause, HsmError) else \
                (f"at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "")
            log.error("audit batch of %d events failed: %s%s",
                      sum(len(p.events) for p in batch), why[:200],
                      f": {detail}" if detail else "")
            AUDIT_FAILURES.labels(type(cause).__name__).inc()
            if self.failing_since is None:
                self.failing_since = time.monotonic()
            for p in batch:
                p.failure = why
            if not isinstance(exc, AfterCommit):  # chained already: the sinks catch up
                self._retry = [e for p in batch if not p.intents for e in p.events
                               if e.action not in NOT_RETRIED][-MAX_RETRY:]
        finally:
            self.busy_since = None

    def _write(self, batch: list[Pending]) -> None:
        events = [e for p in batch for e in p.events]
        if not events:
            return
        try:
            chained = self._commit(events, [i for p in batch if p.intents
                                            for i in (p.intent_ids if p.intent_ids is not None
                                                      else [e.id for e in p.events])])
        except Exception:
            self._unchained(events)  # the sink keeps them: they happened
            raise
        AUDIT_BATCH.observe(len(chained))
        by_id = {c.event.id: c.event for c in chained}
        for p in batch:
            p.chained = [by_id[e.id] for e in p.events]
        try:
            self._anchor_batch(chained)
            self._deliver(chained)
        except Exception as exc:
            raise AfterCommit(str(exc)) from exc

    def _anchor_batch(self, chained: list[Chained]) -> None:
        """Anchor the batch; every other anchor in the token must be in the chain with its
        hash (another writer's, moved since this one last looked, or an older fixed one),
        else the chain was cut or replaced: refused, and that anchor kept as the evidence.
        What this writer knows only ever rises (`_raise_known`): a refusal never lets the
        next batch start below an anchor it has seen."""
        last = chained[-1]
        mine = Anchor(last.event.sequence, last.hash)
        anchor = self._anchor()
        seen = anchor.write(mine)
        AUDIT_ANCHORS.set(len(seen))
        self._raise_known(seen)
        genesis = Anchor(0, GENESIS)  # a new chain's start holds always
        self._verified = {mine} | (self._verified & set(seen))  # only what is still there
        self._match([a for a in seen if a not in self._verified and a != genesis])
        if anchor.prunable:  # more fixed anchors (older kinds, restores) than are kept
            highest = max(seen, key=lambda a: a.seq)
            try:  # housekeeping: the batch is anchored; what stays is pruned next time
                anchor.prune(highest, {a for a in seen if a.seq < highest.seq})
            except HsmError as exc:
                log.warning("older audit anchors not pruned this time: %s", exc)

    def new_chain(self, head: Anchor | None) -> None:
        """`keysvc audit new-chain` moved the anchor to `head`: the one time what this
        writer knows goes down."""
        self._known, self._known_read, self._wrong, self._verified = head, True, [], set()

    def _hold_floor(self, conn: Any, seq: int) -> None:
        """The chain ending at `seq` reaches the highest anchor this writer knows and holds
        it, and every anchor found wrong before; else refused (once the token's anchors
        were replaced by a PIN holder, against the new ones)."""
        for attempt in range(2):
            known = self._known
            why = self._below_floor(conn, seq, known)
            if why is None:
                self._wrong = []   # every anchor refused before holds now
                return
            if attempt or known is None or not self._token_went_back(known):
                raise ChainRefused(why)

    def _below_floor(self, conn: Any, seq: int, known: Anchor | None) -> str | None:
        if known is not None and seq < known.seq:
            return (f"the audit chain in the database ends at sequence {seq} but the HSM "
                    f"anchor says {known.seq}: events were cut, erased or suppressed. keysvc "
                    "will not start a new chain silently (see `keysvc audit-new-chain`)")
        for a in ([known] if known is not None and known.seq else []) + self._wrong:
            at = conn.execute(_HASH_AT, {"at": a.seq}).scalar()
            if at != a.hash:
                return (f"the audit chain in the database differs from the HSM anchor at "
                        f"sequence {a.seq}: events were replaced")
        return None

    def _token_went_back(self, known: Anchor) -> bool:
        """Whether the token's anchors were replaced: this writer's own object is gone, or
        every anchor is below what it knew. Only a PIN holder can do either (`keysvc audit
        new-chain`, a restore), since no writer moves an anchor back or destroys a moving
        one, and the database's holder cannot touch the token. Then this writer follows the
        token, as a restarted one would, rather than refusing until it is restarted. Asked
        twice, and never to no anchor at all: a token that shows nothing is not followed."""
        anchor = self._anchor()
        views = []
        for _ in range(2):
            now = anchor.read()
            if now is None or (not anchor.replaced() and now.seq >= known.seq):
                return False
            views.append(now)
        if views[0] != views[1]:
            return False
        log.warning("the HSM anchor went back from sequence %d to %s (audit new-chain, or a "
                    "restore): following it", known.seq, now.seq if now else "none")
        self.new_chain(now)
        self._anchor().forget()
        return True

    def _raise_known(self, anchors: list[Anchor]) -> None:
        self._known = max(anchors + ([self._known] if self._known else []),
                          key=lambda a: a.seq, default=None)

    def _match(self, anchors: list[Anchor]) -> None:
        """Each of these anchors is in the chain with its hash, or the batch is refused."""
        if not anchors:
            return
        with self.store.engine.connect() as conn:
            held = dict(conn.execute(select(st.audit_events.c.seq, st.audit_events.c.hash)
                                     .where(st.audit_events.c.seq.in_(
                                         [a.seq for a in anchors]))).all())
        wrong = [a for a in anchors if held.get(a.seq) != a.hash]
        if wrong:
            self._wrong = wrong   # checked again before the next batch commits anything
            raise ChainRefused(f"the HSM anchor at sequence {wrong[0].seq} is not in the "
                               "audit chain in the database: events were cut or replaced")
        self._verified.update(anchors)

    def _commit(self, events: list[AuditEvent], intent_ids: list[str]) -> list[Chained]:
        # The slot first: a writer that could not anchor must not chain (a broken slot
        # directory would otherwise leave events the token never heard of).
        self._anchor().slots.name()
        if not self._known_read:
            self._known, self._known_read = self._anchor().read(), True
        with self.store.tx() as conn:
            head = conn.execute(_HEAD_FOR_UPDATE).first()
            seq, prev = (head.seq, head.hash) if head is not None else (0, GENESIS)
            if Anchor.parse(f"{seq}:{prev}") != Anchor(seq, prev) or seq > MAX_SEQ // 2:
                raise ChainRefused(f"the database's audit head ({str(seq)[:24]}) is not a "
                                   "position in a chain: it was edited")
            self._head_is_last_event(conn, seq, prev)
            self._hold_floor(conn, seq)
            if head is None:
                conn.execute(st.audit_head.insert().values(id=1, seq=0, hash=GENESIS))
            first = seq + 1
            named = self._head_version(conn, seq)
            if named > self._mac_primary:  # made by another process: read the token again
                see(self.token, AUDIT_MAC_KEY, named)
            with self.token.session() as s:
                keys = self._mac_keys(s, named)
                self._mac_primary = keys.primary
                if keys.primary < named:
                    # Not even after reading the token again: the last event's MAC is
                    # forged (a database writer's). Chained on under the primary, and
                    # VerifyAuditLog names that event: one edited cell stops no call.
                    log.error("the audit chain's last event names audit-mac version %d, "
                              "which the token does not hold: a forged row "
                              "(VerifyAuditLog names it)", named)
                rows, out, at, link = [], [], seq, prev
                for e in events:
                    at += 1
                    digest = hashlib.sha256(canonical(at, e, link)).hexdigest()
                    mac = keys.make(bytes.fromhex(digest))
                    rows.append(dict(seq=at, id=e.id, time=e.time, actor=e.actor, role=e.role,
                                     action=e.action, target=e.target, outcome=e.outcome,
                                     code=e.code, prev_hash=link, hash=digest, mac=mac))
                    out.append(Chained(replace(e, sequence=at), link, digest, mac))
                    link = digest
            if out:
                seq, prev = out[-1].event.sequence, out[-1].hash
            conn.execute(_INSERT, rows)
            conn.execute(_MOVE_HEAD, {"new_seq": seq, "new_hash": prev})
            if intent_ids:
                conn.execute(st.audit_intents.delete().where(
                    st.audit_intents.c.id.in_(intent_ids)))
                if conn.execute(select(st.audit_intents.c.id).where(
                        st.audit_intents.c.id.in_(intent_ids))).first() is not None:
                    raise ChainRefused("the database did not delete chained audit intents "
                                       "(a trigger or rule keeps them)")
            # Read back: a trigger that drops inserts or holds the head back is found here,
            # before anyone is told the events are kept.
            back = conn.execute(_BETWEEN, {"first": first, "last": seq}).all()
            head_now = conn.execute(_HEAD_NOW).all()
            if sorted(tuple(r) for r in back) != [(c.event.sequence, c.hash) for c in out] \
                    or [tuple(r) for r in head_now] != [(seq, prev)]:
                raise ChainRefused("the database did not keep the audit events as written "
                                   "(a trigger or rule drops or alters them)")
        return out

    def _mac_keys(self, s: Any, named: int) -> MacKeys:
        """The audit-mac versions, found in the token at most every MAC_KEYS_FRESH seconds:
        finding them means reading every secret key's label, 1.5 ms of each batch's 12 ms
        under load (bench/bench_cores.py), while a version is added a few times a year.
        Found again at once when this process made a version, when the module was
        re-initialised (stale handles), or when the chain's last event names a newer
        version than the one kept (another process rotated): no event is ever chained
        under an older version than the one before it."""
        keys, mark = self._keys, (self.token.generation, made_here(AUDIT_MAC_KEY))
        if keys is None or keys.primary < named or mark != self._keys_mark \
                or time.monotonic() - self._keys_at > MAC_KEYS_FRESH \
                or not self._still_names(s, keys):
            keys = self._keys = MacKeys(s, AUDIT_MAC_KEY)
            self._keys_mark, self._keys_at = mark, time.monotonic()
        keys.s = s  # token objects' handles hold across sessions; the MACs use this one
        return keys

    @staticmethod
    def _still_names(s: Any, keys: MacKeys) -> bool:
        """The kept handle of the primary still names that key in this session: SoftHSM2
        keeps a token object's handle for every session and never reuses one, but PKCS#11
        promises a handle only to the session that found it. One call, not a scan, and
        no store lock (keysvc/hsm/store_lock.py): the MAC key is never written after it is
        made, and reading one object that does not change spoils nothing (measured)."""
        try:
            held = s.direct.attribute(s.raw.handle, keys.key(keys.primary).handle,
                                      hk.A.LABEL)
        except Exception:
            return False
        return held == version_label(AUDIT_MAC_KEY, keys.primary).encode()

    @staticmethod
    def _head_is_last_event(conn: Any, seq: int, prev: str) -> None:
        """The head names the chain's last event, with its hash, and no event lies beyond
        it; else the head was edited, and chaining on would fork the chain (VerifyAuditLog
        would then name this writer's own event) or collide with a row."""
        rows = conn.execute(_FROM_HEAD, {"at": max(seq, 1)}).all()
        expected = [(seq, prev)] if seq else []
        if (seq == 0 and prev != GENESIS) or [tuple(r) for r in rows] != expected:
            raise ChainRefused(f"the database's audit head (sequence {seq}) is not the "
                               "chain's last event: it or the events were edited")

    @staticmethod
    def _head_version(conn: Any, head: int) -> int:
        """The audit-mac version the chain's last event names: the writer never chains
        under an older one (VerifyAuditLog refuses that)."""
        if not head:
            return 1
        try:
            return newest_named([conn.execute(_MAC_AT, {"at": head}).scalar()])
        except DBAPIError as exc:
            if st.undecodable(exc):  # an altered row (SQLite): VerifyAuditLog names it
                return 1
            raise

    def _deliver(self, chained: list[Chained]) -> None:
        for sink in self._sinks():
            with getattr(sink, "exclusive", nullcontext)():
                self._deliver_to(sink, chained)

    def _deliver_to(self, sink: Any, chained: list[Chained]) -> None:
        first, last = chained[0].event.sequence, chained[-1].event.sequence
        if sink.cursor is not None and sink.cursor > last:
            if self._holds(sink.cursor, getattr(sink, "cursor_hash", None)):
                # Another worker process wrote past this batch, filling its gap from the
                # chain: this batch's events are there already.
                AUDIT_SINK_LAG.labels(sink.name).set(0)
                return
            # The sink claims events the chain does not have (a forged line): it is
            # written to all the same, and VerifyAuditLog names the line.
            log.error("audit sink %s claims sequence %d beyond the chain's %d",
                      sink.name, sink.cursor, last)
            sink.cursor = first - 1
        behind = last - sink.cursor if sink.cursor is not None else len(chained)
        AUDIT_SINK_LAG.labels(sink.name).set(behind)
        missing: list[dict] = []
        if sink.cursor is not None and sink.cursor < first - 1:
            gap = self.read_chain(sink.cursor + 1, first - 1)
            self._check_gap(gap, sink.cursor + 1, chained[0].prev_hash)
            missing = [line(c) for c in gap]
        todo = missing + [line(c) for c in chained
                          if sink.cursor is None or c.event.sequence > sink.cursor]
        if sink.cursor is None:
            todo.insert(0, {"sink_started_at": first})
        if todo:
            sink.write(todo)
        AUDIT_SINK_LAG.labels(sink.name).set(0)

    def _holds(self, seq: int, hash_: str | None) -> bool:
        """Is (seq, hash) an event of the chain in the database?"""
        if not hash_:
            return False
        with self.store.engine.connect() as conn:
            held = conn.execute(_HASH_AT, {"at": seq}).scalar()
        return held == hash_

    def _check_gap(self, gap: list[Chained], start: int, next_prev: str) -> None:
        """Rows copied from the database into a sink must be the chain: consecutive, each
        hash its own, linked to the next, MACed by the HSM."""
        see(self.token, AUDIT_MAC_KEY, newest_named(c.mac for c in gap))
        with self.token.session() as s:
            keys = MacKeys(s, AUDIT_MAC_KEY)
            for i, c in enumerate(gap):
                digest = hashlib.sha256(canonical(c.event.sequence, c.event, c.prev_hash)
                                        ).hexdigest()
                follows = gap[i + 1].prev_hash if i + 1 < len(gap) else next_prev
                if (c.event.sequence != start + i or digest != c.hash or follows != c.hash
                        or not keys.check(bytes.fromhex(digest), c.mac)):
                    raise ChainRefused(f"audit event {c.event.sequence} in the database fails "
                                       "its hash, link or MAC; it is not copied to the sinks")

    def _unchained(self, events: list[AuditEvent]) -> None:
        """Events that could not be chained go to the sinks once each, marked so."""
        fresh = [e for e in events if e.id not in self._unchained_written
                 and e.action not in NOT_RETRIED]
        if not fresh:
            return
        if len(self._unchained_written) > 100_000:
            self._unchained_written.clear()
        self._unchained_written.update(e.id for e in fresh)
        for sink in self._sinks():
            try:
                with getattr(sink, "exclusive", nullcontext)():
                    sink.write([line(None, e) for e in fresh])
            except Exception as exc:
                log.error("audit sink %s: unchained events not written: %s", sink.name,
                          str(exc)[:200])

    def read_chain(self, first: int, last: int) -> list[Chained]:
        try:
            with self.store.engine.connect() as conn:
                rows = conn.execute(select(st.audit_events).where(
                    st.audit_events.c.seq >= first, st.audit_events.c.seq <= last)
                    .order_by(st.audit_events.c.seq)).all()
            return [row_chained(r) for r in rows]
        except Exception:
            raise ChainRefused(f"an audit event between {first} and {last} in the database "
                               "is malformed") from None
