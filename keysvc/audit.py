"""Tamper-evident audit log: each event hashes its predecessor and is MACed in the HSM.

The hash chain makes deletion and reordering visible; the HMAC (key in the admin token)
stops someone with database access from rewriting the chain consistently. Appends are
serialised through the single `audit_head` row, so replicas sharing a database still build
one chain.

Cutting events off the end (and setting `audit_head` back) leaves a shorter chain that is
still valid, so the chain's head - sequence and hash - is also copied into the admin token
as a data object (a checkpoint): on the first event, then on an append at least
`checkpoint_seconds` after the last copy, and by the server's periodic task when appends
stop. A log that ends before a checkpoint, or holds another event at its sequence, has
lost events. Events after the last checkpoint can still be cut unseen; a log emptied
entirely looks like a new one.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import select, update

from hsm import keys as hk
from keysvc import store as st
from keysvc.clock import Clock, utc_now
from keysvc.partitions import AUDIT_MAC_KEY, Partitions

GENESIS = "0" * 64
log = logging.getLogger("keysvc.audit")


@dataclass(frozen=True)
class AuditEvent:
    id: str
    time: dt.datetime
    actor: str
    role: str
    action: str
    target: str
    outcome: str
    code: str
    sequence: int = 0


@dataclass(frozen=True)
class Verification:
    intact: bool
    events_checked: int
    first_bad_event_id: str = ""  # an event's id, or "" when events are missing at the end
    detail: str = ""


def _canonical(seq: int, e: AuditEvent, prev_hash: str) -> bytes:
    t = e.time.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    fields = [str(seq), e.id, t, e.actor, e.role, e.action, e.target, e.outcome, e.code,
              prev_hash]
    return "\x1f".join(f.replace("\x1f", " ") for f in fields).encode()


def _checkpoint_label(first_event_id: str) -> str:
    """One chain per database; the first event's id tells the chains in one token apart."""
    return f"audit-checkpoint:{first_event_id}"


def _checkpoint_value(seq: int, digest: str) -> bytes:
    return seq.to_bytes(8, "big") + bytes.fromhex(digest)


def _checkpoint_seq(value: bytes) -> int:
    return int.from_bytes(value[:8], "big")


class AuditLog:
    def __init__(self, store: st.Store, partitions: Partitions, clock: Clock = utc_now, *,
                 checkpoint_seconds: float = 5.0) -> None:
        self.store = store
        self.partitions = partitions
        self.clock = clock
        self.checkpoint_seconds = checkpoint_seconds
        self._last_checkpoint = float("-inf")  # time.monotonic() of this process's last
        self._behind: tuple[int, str] | None = None  # a committed head not yet copied
        self._first_event_id = ""

    def _mac(self, data: bytes) -> str:
        with self.partitions.admin.session() as s:
            return hk.hmac_sha256(hk.find_key(s, AUDIT_MAC_KEY), data).hex()

    def append(self, *, actor: str, role: str, action: str, target: str = "",
               outcome: str = "OK", code: str = "") -> AuditEvent:
        event = AuditEvent(id=str(uuid.uuid4()), time=self.clock(), actor=actor, role=role,
                           action=action, target=target[:512], outcome=outcome, code=code)
        with self.store.tx() as conn:
            head = conn.execute(select(st.audit_head).where(st.audit_head.c.id == 1)
                                .with_for_update()).first()
            if head is None:
                conn.execute(st.audit_head.insert().values(id=1, seq=0, hash=GENESIS))
                seq, prev = 1, GENESIS
            else:
                seq, prev = head.seq + 1, head.hash
            digest = hashlib.sha256(_canonical(seq, event, prev)).hexdigest()
            mac = self._mac(bytes.fromhex(digest))
            conn.execute(st.audit_events.insert().values(
                seq=seq, id=event.id, time=event.time, actor=actor, role=role, action=action,
                target=event.target, outcome=outcome, code=code, prev_hash=prev, hash=digest,
                mac=mac))
            conn.execute(update(st.audit_head).where(st.audit_head.c.id == 1)
                         .values(seq=seq, hash=digest))
        if seq == 1:
            self._first_event_id = event.id
        self._behind = (seq, digest)
        if seq == 1 or time.monotonic() - self._last_checkpoint >= self.checkpoint_seconds:
            self.checkpoint()
        return AuditEvent(**{**event.__dict__, "sequence": seq})

    def checkpoint(self) -> None:
        """Copy the last head this process committed into the token, if not done yet.

        Older copies go only once the log shows them true (its event at their sequence has
        their hash); one that does not is kept, as the evidence VerifyAuditLog reports. A
        failure costs only detection, never a call: it is logged.
        """
        behind = self._behind
        if behind is None:
            return
        seq, digest = behind
        try:
            label = _checkpoint_label(self._first_id())
            with self.partitions.admin.session() as s:
                hk.put_data(s, label, _checkpoint_value(seq, digest))
                older = [v for v in hk.data_values(s, label) if _checkpoint_seq(v) < seq]
            hashes = self._hashes_at([_checkpoint_seq(v) for v in older])
            true = {v for v in older if hashes.get(_checkpoint_seq(v)) == v[8:].hex()}
            if len(true) < len(older):
                log.error("audit log: %d checkpoints no longer match the log; kept as "
                          "evidence", len(older) - len(true))
            with self.partitions.admin.session() as s:
                hk.destroy_data(s, label, lambda v: v in true)
            self._last_checkpoint = time.monotonic()
            if self._behind == behind:
                self._behind = None
        except Exception as exc:
            log.error("audit checkpoint at sequence %d not written: %s", seq,
                      type(exc).__name__)

    def checkpoint_if_due(self) -> None:
        """For a periodic task: the last events of a burst reach the token too."""
        if time.monotonic() - self._last_checkpoint >= self.checkpoint_seconds:
            self.checkpoint()

    def _hashes_at(self, seqs: list[int]) -> dict[int, str]:
        if not seqs:
            return {}
        with self.store.engine.connect() as conn:
            return {r.seq: r.hash for r in conn.execute(
                select(st.audit_events.c.seq, st.audit_events.c.hash).where(
                    st.audit_events.c.seq.in_(seqs)))}

    def _first_id(self) -> str:
        """The chain's first event id ("" while the log is empty), read once."""
        if not self._first_event_id:
            with self.store.engine.connect() as conn:
                self._first_event_id = conn.execute(select(st.audit_events.c.id).where(
                    st.audit_events.c.seq == 1)).scalar() or ""
        return self._first_event_id

    def _checkpoints_in_token(self, first_event_id: str) -> dict[int, set[str]]:
        """Every checkpoint of this chain: sequence -> the hashes copied at it."""
        with self.partitions.admin.session() as s:
            values = hk.data_values(s, _checkpoint_label(first_event_id))
        out: dict[int, set[str]] = {}
        for v in values:
            out.setdefault(_checkpoint_seq(v), set()).add(v[8:].hex())
        return out

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
        with self.store.engine.connect() as conn:
            rows = conn.execute(q).all()
        more = len(rows) > page_size
        rows = rows[:page_size]
        events = [_row_event(r) for r in rows]
        return events, (rows[-1].seq if more and rows else 0)

    def verify(self) -> Verification:
        """Walk the chain; the first event whose hash, link, MAC or position is wrong.

        Read in the order things are written, so that appends meanwhile raise no false
        alarm: the checkpoints (each copied after its event committed), then the head, then
        the events up to the head.
        """
        checked = 0
        prev, expected_seq = GENESIS, 1
        first = self._first_id()
        checkpoints = self._checkpoints_in_token(first) if first else {}
        with self.store.engine.connect() as conn:
            head = conn.execute(select(st.audit_head)).first()
            q = select(st.audit_events).order_by(st.audit_events.c.seq)
            if head is not None:
                q = q.where(st.audit_events.c.seq <= head.seq)
            rows = conn.execute(q).all()
        with self.partitions.admin.session() as s:
            mac_key = hk.find_key(s, AUDIT_MAC_KEY)
            for n, r in enumerate(rows, 1):
                if n % 1024 == 0:
                    self.partitions.admin.breathe()  # a long log must not stall appends
                e = _row_event(r)
                digest = hashlib.sha256(_canonical(r.seq, e, r.prev_hash)).hexdigest()
                good = (r.seq == expected_seq and r.prev_hash == prev and digest == r.hash
                        and hmac.compare_digest(
                            hk.hmac_sha256(mac_key, bytes.fromhex(digest)).hex(), r.mac))
                if r.seq in checkpoints and checkpoints[r.seq] != {r.hash}:
                    good = False  # not the event the HSM saw at this position
                if not good:
                    return Verification(False, checked + 1, r.id,
                                        f"event {r.seq} fails its hash, link, MAC, position "
                                        "or checkpoint")
                checked += 1
                prev, expected_seq = r.hash, r.seq + 1
        if head is not None and (head.seq != checked or head.hash != prev):
            # events were removed from the end of the chain
            return Verification(False, checked, "", "the head names sequence "
                                f"{head.seq}: events missing after sequence {checked}")
        if checkpoints and max(checkpoints) > checked:
            return Verification(False, checked, "", "the HSM checkpoint has sequence "
                                f"{max(checkpoints)}: events missing after sequence {checked}")
        return Verification(True, checked)


def _row_event(r) -> AuditEvent:
    t = r.time if r.time.tzinfo else r.time.replace(tzinfo=dt.timezone.utc)
    return AuditEvent(id=r.id, time=t, actor=r.actor, role=r.role, action=r.action,
                      target=r.target, outcome=r.outcome, code=r.code, sequence=r.seq)
