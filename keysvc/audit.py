"""Tamper-evident audit log: each event hashes its predecessor and is MACed in the HSM.

The hash chain makes deletion and reordering visible; the HMAC (key in the admin token)
stops someone with database access from rewriting the chain consistently. Appends are
serialised through the single `audit_head` row, so replicas sharing a database still build
one chain.

Cutting events off the end (and setting `audit_head` back) leaves a shorter chain that is
still valid, so the chain's head - sequence and hash - is also copied into the admin token
as a data object (the checkpoint) on the first event and then at most every
`checkpoint_seconds`: a log that ends before its checkpoint has lost events. Events after
the last checkpoint can still be cut unseen; a log emptied entirely looks like a new one.
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
    first_bad_event_id: str = ""


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
        if seq == 1 or time.monotonic() - self._last_checkpoint >= self.checkpoint_seconds:
            self._checkpoint(event.id if seq == 1 else "", seq, digest)
        return AuditEvent(**{**event.__dict__, "sequence": seq})

    def _checkpoint(self, first_event_id: str, seq: int, digest: str) -> None:
        """Copy a committed head into the token; older copies go (another replica's newer
        one stays). A failure costs only detection, never the call: it is logged."""
        try:
            first = first_event_id or self._first_id()
            label = _checkpoint_label(first)
            with self.partitions.admin.session() as s:
                hk.put_data(s, label, _checkpoint_value(seq, digest))
                hk.destroy_data(s, label, lambda v: _checkpoint_seq(v) < seq)
            self._last_checkpoint = time.monotonic()
        except Exception as exc:
            log.error("audit checkpoint at sequence %d not written: %s", seq,
                      type(exc).__name__)

    def _first_id(self) -> str:
        if not self._first_event_id:
            with self.store.engine.connect() as conn:
                self._first_event_id = conn.execute(select(st.audit_events.c.id).where(
                    st.audit_events.c.seq == 1)).scalar_one()
        return self._first_event_id

    def _checkpoint_in_token(self, first_event_id: str) -> tuple[int, str]:
        """The newest checkpoint of this chain (0, "" if none)."""
        with self.partitions.admin.session() as s:
            values = hk.data_values(s, _checkpoint_label(first_event_id))
        if not values:
            return 0, ""
        best = max(values, key=_checkpoint_seq)
        return _checkpoint_seq(best), best[8:].hex()

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
        """Walk the chain; the first event whose hash, link, MAC or position is wrong."""
        checked = 0
        prev, expected_seq = GENESIS, 1
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(st.audit_events).order_by(st.audit_events.c.seq)).all()
            head = conn.execute(select(st.audit_head)).first()
        checkpoint_seq, checkpoint_hash = self._checkpoint_in_token(rows[0].id) if rows \
            else (0, "")
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
                if r.seq == checkpoint_seq and r.hash != checkpoint_hash:
                    good = False  # not the event the HSM saw at this position
                if not good:
                    return Verification(False, checked + 1, r.id)
                checked += 1
                prev, expected_seq = r.hash, r.seq + 1
        if head is not None and (head.seq != checked or head.hash != prev):
            # events were removed from the end of the chain
            return Verification(False, checked, "(end of log: events missing after "
                                                f"sequence {checked})")
        if checkpoint_seq > checked:
            return Verification(False, checked, "(end of log: the HSM checkpoint has sequence "
                                                f"{checkpoint_seq}; events missing after "
                                                f"sequence {checked})")
        return Verification(True, checked)


def _row_event(r) -> AuditEvent:
    t = r.time if r.time.tzinfo else r.time.replace(tzinfo=dt.timezone.utc)
    return AuditEvent(id=r.id, time=t, actor=r.actor, role=r.role, action=r.action,
                      target=r.target, outcome=r.outcome, code=r.code, sequence=r.seq)
