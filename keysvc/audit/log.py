"""The audit trail no one can silence (issue 14).

- Every call's event is chained (hash of its predecessor, HMAC in the admin token) before
  the call returns; if it cannot be, the call fails closed with UNAVAILABLE
  AUDIT_UNAVAILABLE, read-only calls included. A call's effect and its event commit in one
  transaction (`calls.py`); calls arriving together share one batch (`writer.py`).
- The HSM knows how long the chain is (`anchor.py`): a cut, erased or suppressed chain is
  found by VerifyAuditLog, and the writer will not append to it.
- Each event also goes to sinks outside the database (`sinks.py`): a JSON-lines file, and
  syslog over TLS if configured; VerifyAuditLog compares the chain with the file.
"""
from __future__ import annotations

import builtins
import datetime as dt
import hashlib
import json
import logging
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from keysvc import store as st
from keysvc.audit.anchor import Anchor, ChainAnchor
from keysvc.audit.calls import CallAudit
from keysvc.audit.chain import (
    GENESIS,
    AuditEvent,
    Chained,
    Verification,
    canonical,
    event_from_json,
    line,
    row_chained,
    row_event,
)
from keysvc.audit.sinks import JsonlSink, SyslogSink, first_difference, read_lines
from keysvc.audit.writer import AuditWriter
from keysvc.clock import Clock, utc_now
from keysvc.custody.versions import MacKeys, newest_named, see, untagged
from keysvc.hsm.errors import HsmError, HsmKeyNotFound, HsmUnavailable
from keysvc.partitions import AUDIT_MAC_KEY, Partitions

log = logging.getLogger("keysvc.audit")
# Events verified between chances for other callers to use the HSM (about 5 ms): one HSM lock
# serves every token of the module, and at 1,024 (about 170 ms) two verifications of a
# 30,000-event chain made the S1SP's calls wait 0.8 s at the median (review, session 18).
VERIFY_BREATHE_EVERY = 32



class AuditLog:
    def __init__(self, store: st.Store, partitions: Partitions, clock: Clock = utc_now, *,
                 instance: Callable[[], str] = lambda: "none", timeout: float = 5.0,
                 sink_dir: Path | None = None, sink_max_bytes: int = 64 * 1024 * 1024,
                 sink_keep: int = 10, syslog: dict | None = None,
                 anchor_slots: Path = Path(".keysvc/audit-anchor-slots"),
                 commit_delay: float = 0.0) -> None:
        self.store = store
        self.partitions = partitions
        self.clock = clock
        self._instance = instance
        self._sink_dir = sink_dir
        self._anchor_slots = anchor_slots
        self._sink_max_bytes, self._sink_keep = sink_max_bytes, sink_keep
        self._syslog = syslog or {}
        self._timeout = timeout
        self._sinks: list | None = None
        self._anchor: ChainAnchor | None = None
        self._mac_counts: tuple[tuple[int, ...], float, dict[int, int]] | None = None
        self.writer = AuditWriter(store, partitions.admin, self.anchor, self.sinks, timeout,
                                  commit_delay)

    # ------------------------------------------------------------------ parts
    def anchor(self) -> ChainAnchor:
        if self._anchor is None:
            self._anchor = ChainAnchor(self.partitions.admin, self._instance(),
                                       self._anchor_slots)
        return self._anchor

    @property
    def sink_path(self) -> Path | None:
        if self._sink_dir is None:
            return None
        # (One file for all the worker processes of a server: see JsonlSink.exclusive.)
        return self._sink_dir / f"audit-{self._instance()}.jsonl"

    def sinks(self) -> list:
        if self._sinks is None:
            sinks: list = []
            if self.sink_path is not None:
                sinks.append(JsonlSink(self.sink_path, self._sink_max_bytes, self._sink_keep,
                                       lock_timeout=self._timeout))
            if self._syslog.get("address"):
                sinks.append(SyslogSink(**self._syslog))
            self._sinks = sinks
        return self._sinks

    def close(self) -> None:
        """Give up this process's anchor slot (a writer used again takes one anew)."""
        if self._anchor is not None:
            self._anchor.release()

    def healthy(self) -> bool:
        return self.writer.healthy()

    # ------------------------------------------------------------------ writing
    def append(self, *, actor: str, role: str, action: str, target: str = "",
               outcome: str = "OK", code: str = "") -> AuditEvent:
        """One event, chained and in every sink when this returns (else AUDIT_UNAVAILABLE)."""
        event = AuditEvent(id=str(uuid.uuid4()), time=self.clock(), actor=actor, role=role,
                           action=action, target=target[:512], outcome=outcome, code=code)
        return self.writer.submit([event])[0]

    def call(self, actor: str, role: str, action: str, target: Callable[[], str]) -> CallAudit:
        return CallAudit(actor, role, action, lambda: self.clock(), target, self.intent_mac)

    def intent_mac(self, event_text: str) -> str:
        """An intent is MACed in the HSM as it is written: a row a database writer adds or
        edits is not chained as if a call had made it."""
        with self.partitions.admin.session() as s:
            return MacKeys(s, AUDIT_MAC_KEY).make(b"audit-intent\x1f" + event_text.encode())

    def intent_valid(self, event_text: str, mac: Any) -> bool:
        see(self.partitions.admin, AUDIT_MAC_KEY, newest_named([mac]))
        with self.partitions.admin.session() as s:
            return MacKeys(s, AUDIT_MAC_KEY).check(b"audit-intent\x1f" + event_text.encode(),
                                                   mac)

    def finish(self, call: CallAudit, outcome: str, code: str) -> None:
        """The call's events: its committed intents and, if it failed or changed nothing,
        its outcome. Returns once they are kept; raises AUDIT_UNAVAILABLE otherwise."""
        intents, final = call.events(outcome, code)
        self.writer.submit(intents + ([final] if final else []), intents=bool(intents))

    def recover_intents(self, older_than: float | None = None) -> int:
        """Chain the intents a crash left (their effects committed, their events not yet
        chained). At start and periodically. An intent younger than twice the audit timeout
        may still be on its way through a live writer (here or on another replica).

        Each row is checked on its own. Its event counts only if its MAC (made in the HSM
        when the call wrote it) verifies; then it is deleted if that very event is already
        in the chain (a writer raced this sweep), and chained otherwise. A row whose MAC
        fails, or whose id was changed, gets an `audit.intent_forged` event of its own."""
        if older_than is None:
            older_than = 2 * self.writer.timeout
        cutoff = self.clock() - dt.timedelta(seconds=older_than)
        with self.store.engine.connect() as conn:
            # An intent dated in the future (a database writer hiding it from the sweep) is
            # taken too, and fails its MAC unless a call really wrote it.
            future = self.clock() + dt.timedelta(seconds=60)
            ids = [r.id for r in conn.execute(select(st.audit_intents.c.id).where(
                (st.audit_intents.c.created_at <= cutoff)
                | (st.audit_intents.c.created_at > future))).all()]
            if not ids:
                return 0
            rows = []
            for intent_id in ids:
                try:
                    rows.append((intent_id, conn.execute(select(st.audit_intents.c.event).where(
                        st.audit_intents.c.id == intent_id)).scalar()))
                except Exception:
                    rows.append((intent_id, None))
            sealed = {rid: self._sealed_event(text) for rid, text in rows}
            chained = self._truly_chained(conn, [e for e in sealed.values() if e is not None])
        events: list[AuditEvent] = []
        for rid, e in sealed.items():
            if e is not None and e.id in chained:
                continue  # that very event is in the chain: the row only goes
            if e is not None:
                events.append(e)
            if e is None or e.id != rid:
                events.append(self._forged(rid))
        done = list(sealed)
        if not events:
            with self.store.tx() as conn:
                conn.execute(st.audit_intents.delete().where(st.audit_intents.c.id.in_(done)))
            return 0
        self.writer.submit(events, intents=True, alone=True, intent_ids=done)
        log.warning("chained %d audit events left by a crash", len(events))
        return len(events)

    def _sealed_event(self, text: str | None) -> AuditEvent | None:
        """The event an intent row carries, if its MAC verifies (else None)."""
        try:
            wrapper = json.loads(text or "")
            e = event_from_json(wrapper["event"])
            if self.intent_valid(wrapper["event"], wrapper["mac"]):
                return e
        except Exception:
            pass
        return None

    def _forged(self, intent_id: str) -> AuditEvent:
        log.error("audit intent %s fails its MAC, is malformed or was renamed", intent_id[:64])
        return AuditEvent(id=str(uuid.uuid4()), time=self.clock(), actor="keysvc", role="",
                          action="audit.intent_forged",
                          target=f"intent {intent_id[:64]} in the database fails its MAC, is "
                                 "malformed or was renamed; not chained as a call's event",
                          outcome="ERROR", code="RECORD_SEAL_INVALID")

    def _truly_chained(self, conn, events: list[AuditEvent]) -> set[str]:
        """Which of these events are in the chain as they are: a row of that id within the
        head whose hash is this event's at that place, and whose MAC verifies."""
        if not events:
            return set()
        by_id = {e.id: e for e in events}
        head = conn.execute(select(st.audit_head.c.seq)).scalar() or 0
        try:
            rows = conn.execute(select(st.audit_events.c.seq, st.audit_events.c.id,
                                       st.audit_events.c.prev_hash, st.audit_events.c.hash,
                                       st.audit_events.c.mac).where(
                st.audit_events.c.id.in_(list(by_id)), st.audit_events.c.seq <= head)).all()
        except Exception:
            return set()
        out = set()
        see(self.partitions.admin, AUDIT_MAC_KEY, newest_named(r.mac for r in rows))
        with self.partitions.admin.session() as s:
            keys = MacKeys(s, AUDIT_MAC_KEY)
            for r in rows:
                try:
                    e = replace(by_id[r.id], sequence=0)
                    digest = hashlib.sha256(canonical(r.seq, e, r.prev_hash)).hexdigest()
                    if digest == r.hash and keys.check(bytes.fromhex(digest), r.mac):
                        out.add(r.id)
                except Exception:
                    continue
        return out

    COUNT_TTL = 60.0  # seconds a count by version is shown again before it is taken anew

    def count_by_mac_version(self, versions: builtins.list[int]) -> dict[int, int]:
        """Chained events and pending intents by the audit-mac version their MAC names,
        for ListKeyVersions (informational: audit-mac versions are never destroyed). Each
        count is a scan of the table, so it is taken at most once a minute (`rewrap status
        --watch` asks every second)."""
        now = time.monotonic()
        cached = self._mac_counts
        if cached and cached[0] == tuple(versions) and now - cached[1] < self.COUNT_TTL:
            return dict(cached[2])
        out = self._count_by_mac_version(versions)
        self._mac_counts = (tuple(versions), now, out)
        return dict(out)

    def _count_by_mac_version(self, versions: builtins.list[int]) -> dict[int, int]:
        mac = st.audit_events.c.mac
        out = {}
        with self.store.engine.connect() as conn:
            for v in versions:
                named = ~mac.like("v%") if v == 1 else mac.like(f"v{v}:%")
                out[v] = conn.execute(select(func.count()).select_from(st.audit_events)
                                      .where(named)).scalar() or 0
            ids = [r.id for r in conn.execute(select(st.audit_intents.c.id))]
            for intent_id in ids:  # one by one: a row that cannot be read is skipped
                try:
                    text = conn.execute(select(st.audit_intents.c.event).where(
                        st.audit_intents.c.id == intent_id)).scalar()
                    v = untagged(json.loads(text or "")["mac"])[0]
                except Exception:  # altered (not even text, or nested past any limit)
                    continue
                out[v] = out.get(v, 0) + 1
        return out

    def new_chain(self, reason: str) -> AuditEvent:
        """Break glass (`keysvc audit new-chain`, run with the admin PIN): the database chain
        is behind the HSM anchor and an operator decides to go on. The anchor is moved to
        the database's head and the first event says what was lost and why."""
        anchor = self.anchor().read()
        with self.store.engine.connect() as conn:
            head = conn.execute(select(st.audit_head)).first()
        seq, digest = (head.seq, head.hash) if head is not None else (0, GENESIS)
        self.anchor().reset(Anchor(seq, digest))
        self.writer.new_chain(Anchor(seq, digest))
        lost = (f"the HSM anchor named sequence {anchor.seq} ({anchor.hash[:16]}...)"
                if anchor else "no HSM anchor")
        return self.append(actor="keysvc", role="", action="audit.new_chain",
                           target=f"{lost}; the database chain ends at {seq}; {reason}",
                           outcome="OK", code="AUDIT_NEW_CHAIN")

    # ------------------------------------------------------------------ reading
    def list(self, *, since: dt.datetime | None = None, actor: str = "", action: str = "",
             page_size: int = 100, after_seq: int = 0) -> tuple[list[AuditEvent], int]:
        """Events in chain order; returns (events, last seq) for the next page token."""
        page_size = max(1, min(page_size or 100, 1000))
        q = select(st.audit_events).where(st.audit_events.c.seq > after_seq)
        if since is not None:
            q = q.where(st.audit_events.c.time >= since)
        if actor:
            q = q.where(st.audit_events.c.actor == actor)
        if action:
            q = q.where(st.audit_events.c.action == action)
        q = q.order_by(st.audit_events.c.seq).limit(page_size + 1)
        rows = self._rows(q)
        more = len(rows) > page_size
        rows = rows[:page_size]
        return [_shown(r) for r in rows], (rows[-1].seq if more and rows else 0)

    def _rows(self, q) -> builtins.list[Any]:
        """The rows of `q`; a row whose values the database cannot even hand over as their
        types (a date that is not one) comes back as its sequence and id only."""
        with self.store.engine.connect() as conn:
            try:
                return builtins.list(conn.execute(q).all())
            except (ValueError, TypeError, OverflowError, UnicodeDecodeError):
                pass
            except DBAPIError as exc:
                if not st.undecodable(exc):
                    raise
            keys = conn.execute(q.with_only_columns(st.audit_events.c.seq,
                                                    st.audit_events.c.id)).all()
            out = []
            for k in keys:
                try:
                    out.append(conn.execute(select(st.audit_events).where(
                        st.audit_events.c.seq == k.seq)).one())
                except (ValueError, TypeError, OverflowError, UnicodeDecodeError):
                    out.append(k)
                except DBAPIError as exc:
                    if not st.undecodable(exc):
                        raise
                    out.append(k)
            return out

    def _head_now(self) -> int:
        """The head as it is now (appends may have moved it while verify read)."""
        with self.store.engine.connect() as conn:
            return conn.execute(select(st.audit_head.c.seq)).scalar() or 0

    def export(self, since: int, limit: int = 1000) -> builtins.list[Chained]:
        """Chained events after sequence `since` (a SIEM's resumable cursor)."""
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(st.audit_events).where(st.audit_events.c.seq > since)
                                .order_by(st.audit_events.c.seq).limit(limit)).all()
        return [row_chained(r) for r in rows]

    def verify(self, sink: Path | None = None) -> Verification:
        """Walk the chain; the first event whose hash, link, MAC or position is wrong; then
        the HSM anchor (a chain shorter than it, or another event at its sequence) and the
        sink file (the first difference).

        Read in the order things are written, so that appends meanwhile raise no false
        alarm: the anchor (written after its batch committed), then the head, then the
        events up to the head."""
        anchors = self.anchor().all()  # every one must agree with the chain, not only the top
        at_seq: dict[int, set[str]] = {}
        for a in anchors:
            at_seq.setdefault(a.seq, set()).add(a.hash)
        with self.store.engine.connect() as conn:
            head = conn.execute(select(st.audit_head)).first()
        q = select(st.audit_events).order_by(st.audit_events.c.seq)
        if head is not None:
            q = q.where(st.audit_events.c.seq <= head.seq)
        rows = self._rows(q)
        legacy = self.anchor().legacy_checkpoints(rows[0].id if rows else "")
        checked, prev, expected_seq, version = 0, GENESIS, 1, 1
        hashes: dict[int, tuple[str, str]] = {}
        see(self.partitions.admin, AUDIT_MAC_KEY,
            newest_named(getattr(r, "mac", "") for r in rows))
        with self.partitions.admin.session() as s:
            keys = MacKeys(s, AUDIT_MAC_KEY)
            for n, r in enumerate(rows, 1):
                if n % VERIFY_BREATHE_EVERY == 0:
                    self.partitions.admin.breathe()  # a long log must not stall appends
                try:
                    e = row_event(r)
                    digest = hashlib.sha256(canonical(r.seq, e, r.prev_hash)).hexdigest()
                    # An event MACed under an older audit-mac version than one before it
                    # is not keysvc's: once a version is primary, no writer uses an older
                    # one (AuditWriter), so an old version, even lost, forges nothing later.
                    named = untagged(r.mac)[0]
                    if named < version:
                        return Verification(False, checked + 1, r.id, (
                            f"event {r.seq} names audit-mac version {named}, older than "
                            f"version {version} of an event before it: not keysvc's"))
                    good = (r.seq == expected_seq and r.prev_hash == prev and digest == r.hash
                            and keys.check(bytes.fromhex(digest), r.mac))
                    version = named
                    if r.seq in legacy and legacy[r.seq] != {r.hash}:
                        good = False
                    if r.seq in at_seq and at_seq[r.seq] != {r.hash}:
                        good = False  # not the event the HSM saw at this position
                except HsmKeyNotFound:  # a MAC version the HSM never had: not keysvc's
                    good = False
                except HsmError as exc:  # the HSM failing is not an event altered: an
                    # outage (review 3, session 18: it named an event as altered; review 4:
                    # a failed operation ended INTERNAL)
                    raise HsmUnavailable("the HSM failed during the verification "
                                         f"({type(exc).__name__})") from None
                except Exception:  # a malformed row: named, never an internal error
                    good = False
                if not good:
                    return Verification(False, checked + 1, r.id,
                                        f"event {r.seq} fails its hash, link, MAC, position "
                                        "or the HSM anchor")
                checked += 1
                hashes[r.seq] = (r.id, r.hash)
                prev, expected_seq = r.hash, r.seq + 1
        if head is not None:
            with self.store.engine.connect() as conn:
                beyond = conn.execute(select(st.audit_events.c.seq).where(
                    st.audit_events.c.seq > head.seq).order_by(st.audit_events.c.seq)
                    .limit(1)).scalar()
            if beyond is not None and beyond > self._head_now():
                return Verification(False, checked, "", f"an event at sequence {beyond} lies "
                                    f"beyond the head ({head.seq}): not written by keysvc")
        if head is not None and (head.seq != checked or head.hash != prev):
            return Verification(False, checked, "", "the head names sequence "
                                f"{head.seq}: events missing after sequence {checked}")
        top = max(at_seq, default=0)
        if legacy:
            top = max(top, max(legacy))
        if top > checked:
            return Verification(False, checked, "", f"the HSM anchor has sequence {top}: "
                                f"events missing after sequence {checked}")
        path = sink or self.sink_path
        if path is not None and (path.exists() or sink is not None):
            diff = first_difference(
                ({"seq": k, "id": v[0], "hash": v[1]} for k, v in sorted(hashes.items())),
                read_lines(path), upto=checked)
            if diff:
                return Verification(False, checked, "", f"audit file {path.name}: {diff}")
        return Verification(True, checked)


def _shown(r) -> AuditEvent:
    """A row as an event; a malformed one as what it is."""
    try:
        return row_event(r)
    except Exception:
        return AuditEvent(id=str(r.id), time=dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc),
                          actor="", role="", action="audit.malformed_row",
                          target=f"event {r.seq} in the database is malformed", outcome="ERROR",
                          code="RECORD_SEAL_INVALID", sequence=int(r.seq))


__all__ = ["AuditLog", "AuditEvent", "Verification", "CallAudit", "Chained", "line"]
