"""Operations and their approvals (the `operations` table): dual control's record.

An operation's seal covers its kind, target, partition, requester, state and whole request;
the request also has a digest of its own (`request_digest`), and every approval is a
statement sealed in the HSM that binds the approving officer to that digest. So a made-up
approver, a rewritten request (another purpose, other key bits) or an operation inserted by
hand fails at approval and at execution, and an older copy put back fails its anchor.
"""
from __future__ import annotations

import base64
import builtins
import datetime as dt
import hashlib
import hmac
import json
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from keysvc import store as st
from keysvc.anchors import anchored as is_anchored
from keysvc.errors import KeysvcError
from keysvc.hsm import HsmUnavailable
from keysvc.records.seal import canonical, decode, parse_utc

if TYPE_CHECKING:
    from keysvc.records import Records

# Parts of a payload that change while an operation waits (officers' sealed components);
# everything else is the request the officers approve.
MUTABLE_PAYLOAD = ("components",)


@dataclass(frozen=True)
class Approval:
    officer: str
    digest: str
    mac: bytes = field(repr=False)
    # The officer's key: SHA-256 of the client certificate's public key (SPKI), so that one
    # key in two certificates (two CNs) is one officer. "" where no certificate was seen.
    key: str = ""
    # The certificate itself: "<issuing CA's key fingerprint>:<serial hex>", so that an
    # approval stops counting once a CRL revokes that certificate. "" before issue 13.
    cert: str = ""

    @property
    def who(self) -> set[str]:
        """What an officer is known by: the certificate's key and the normalised name. Two
        approvals are two officers only if they share neither (two CNs on one key, or one
        CN in two spellings on two keys, are one officer)."""
        return {x for x in (self.key, "name:" + officer_name(self.officer)) if x}


def officer_name(identity: str) -> str:
    """A CN compared without case or spaces (the interceptor admits ASCII CNs only, so no
    look-alike script or invisible character makes one officer two either)."""
    return "".join(identity.split()).casefold()


def approval_statement(op_id: str, officer: str, key: str, digest: str, cert: str = ""
                       ) -> bytes:
    """What an approval's MAC covers: this officer (key and certificate) approves this
    request."""
    if cert:
        return canonical("approval", op_id, officer, key, digest, cert)
    return canonical("approval", op_id, officer, key, digest)


@dataclass(frozen=True)
class OperationRecord:
    id: str
    partition: str
    kind: str
    target: str
    state: str
    requested_by: str
    approvals: tuple[Approval, ...]
    payload: dict
    message: str
    created_at: dt.datetime
    updated_at: dt.datetime

    @classmethod
    def placeholder(cls, op_id: str) -> "OperationRecord":
        """An altered record as listings show it: its id, nothing the row claims."""
        t = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
        return cls(op_id, "", "", "", "", "", (), {}, "", t, t)

    @property
    def request(self) -> dict:
        return {k: v for k, v in self.payload.items() if k not in MUTABLE_PAYLOAD}

    @property
    def digest(self) -> str:
        return request_digest(self.kind, self.target, self.partition, self.request)

    @property
    def approved_by(self) -> tuple[str, ...]:
        return tuple(a.officer for a in self.approvals)

    def canonical(self) -> bytes:
        return canonical("operation", self.id, self.partition, self.kind, self.target,
                         self.state, self.requested_by, _approvals_json(self.approvals),
                         st.dumps(self.payload), self.message, self.created_at,
                         self.updated_at)

    def row(self) -> dict:
        return {"id": self.id, "partition": self.partition, "kind": self.kind,
                "target": self.target, "state": self.state,
                "requested_by": self.requested_by,
                "approvals": _approvals_json(self.approvals),
                "payload": st.dumps(self.payload), "message": self.message,
                "created_at": self.created_at, "updated_at": self.updated_at}


def request_digest(kind: str, target: str, partition: str, request: dict) -> str:
    """SHA-256 over the request as approved: what an approval's statement names."""
    return hashlib.sha256(canonical("request", kind, target, partition,
                                    st.dumps(request))).hexdigest()


def _approvals_json(approvals: tuple[Approval, ...]) -> str:
    return st.dumps([{"officer": a.officer, "digest": a.digest, "key": a.key,
                      "mac": base64.b64encode(a.mac).decode(), **({"cert": a.cert} if a.cert
                                                                  else {})}
                     for a in approvals])


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def from_canonical(data: bytes) -> OperationRecord:
    """The record an anchor carries (`OperationRecord.canonical`), for roll-forward."""
    f = [b.decode() for b in decode(data)]
    if len(f) != 12 or f[0] != "operation":
        raise ValueError("not an operation record")
    approvals = tuple(Approval(a["officer"], a["digest"], base64.b64decode(a["mac"]),
                               a.get("key", ""), a.get("cert", "")) for a in json.loads(f[7]))
    return OperationRecord(f[1], f[2], f[3], f[4], f[5], f[6], approvals, json.loads(f[8]),
                           f[9], parse_utc(f[10]), parse_utc(f[11]))


def _record(r: Any) -> OperationRecord:
    approvals = tuple(Approval(a["officer"], a["digest"], base64.b64decode(a["mac"]),
                               a.get("key", ""), a.get("cert", ""))
                      for a in json.loads(r.approvals))
    return OperationRecord(r.id, r.partition, r.kind, r.target, r.state, r.requested_by,
                           approvals, json.loads(r.payload), r.message,
                           _aware(r.created_at), _aware(r.updated_at))


class Operations:
    def __init__(self, records: "Records") -> None:
        self.r = records

    def approval(self, op: OperationRecord, officer: str, key: str = "", cert: str = ""
                 ) -> Approval:
        """A sealed statement: `officer` (with this certificate and key) approves the
        request with this digest."""
        digest = op.digest
        mac = self.r.sealers[op.partition].seal(approval_statement(op.id, officer, key, digest,
                                                                   cert))
        return Approval(officer, digest, mac, key, cert)

    def _approvals_ok(self, op: OperationRecord) -> bool:
        digest = op.digest
        if not op.approvals or op.approvals[0].officer != op.requested_by:
            return False
        made = self.r.sealers[op.partition].seal_many(
            approval_statement(op.id, a.officer, a.key, a.digest, a.cert)
            for a in op.approvals)
        seen: set[str] = set()
        distinct = True
        for a in op.approvals:
            distinct = distinct and not (a.who & seen)
            seen |= a.who
        return distinct and all(a.digest == digest and hmac.compare_digest(m, a.mac)
                                for a, m in zip(op.approvals, made))

    # ------------------------------------------------------------------ reads
    def partition_of(self, op_id: str) -> str | None:
        """Which partition's token seals this operation (unverified: a wrong answer only
        makes the seal check fail)."""
        with self.r.store.engine.connect() as conn:
            p = conn.execute(select(st.operations.c.partition).where(
                st.operations.c.id == op_id)).scalar()
        if p is None:
            return None
        return p if p in self.r.sealers else "s1sp"

    def get(self, conn: Any, op_id: str, *, for_update: bool = False
            ) -> OperationRecord | None:
        q = select(st.operations).where(st.operations.c.id == op_id)
        if for_update:
            q = q.with_for_update()
        where = f"operations/{op_id}"
        row = self.r.fetch(conn, q, where)
        if row is None:
            return None
        try:
            op = _record(row)
        except Exception:
            raise self.r.refuse(conn, where, "is malformed") from None
        sealer = self.r.served_sealer(op.partition, f"op/{op.id}")  # PARTITION_NOT_SERVED
        if sealer is None or not sealer.valid(op.canonical(), row.seal):
            raise self.r.refuse(conn, where, "fails its HSM seal")
        if not self._approvals_ok(op):
            raise self.r.refuse(conn, where, "holds an approval that is not a sealed "
                                             "statement for this request")
        if not self.r.anchors(op.partition).holds(f"op/{op.id}", bytes(row.seal)):
            raise self.r.refuse(conn, where, "is not the current record (anchor)")
        return op

    def list(self) -> list[tuple[OperationRecord, bool]]:
        rows = self.r.fetch_each(st.operations, st.operations.c.id,
                                 st.operations.c.created_at)
        anchors = {p: self.r.anchors(p).all() for p in self.r.sealers}
        out = []
        for op_id, row in rows:
            if row is None:
                self.r.flag(f"operations/{op_id}", "is malformed")
                out.append((OperationRecord.placeholder(str(op_id)), False))
                continue
            try:
                op = _record(row)
                if self.r.elsewhere(op.partition, f"op/{op.id}", anchors):
                    continue  # another partition's operation: its own process lists it
                ok = (self.r.sealers[op.partition].valid(op.canonical(), row.seal)
                      and self._approvals_ok(op)
                      and is_anchored(anchors[op.partition].get(f"op/{op.id}", []),
                                      row.seal))
            except HsmUnavailable:
                raise  # the HSM busy or down is not a record that fails its seal
            except Exception:
                ok = False
            if not ok:
                self.r.flag(f"operations/{row.id}", "fails its HSM seal, approvals or "
                                                    "anchor")
                op = OperationRecord.placeholder(str(row.id))
            out.append((op, ok))
        return out

    def anchored_state(self, op_id: str, partition: str) -> str | None:
        """The operation's state as its newest anchor in the token says, if that anchor is
        one record sealed by the partition's key; None if there is none such. The token's
        word, for decisions the database must not be able to sway."""
        top = self.r.anchors(partition).newest(f"op/{op_id}")
        if len(top) != 1 or not top[0].payload:
            return None
        try:
            op = from_canonical(top[0].payload)
        except (ValueError, KeyError, UnicodeDecodeError):
            return None
        if op.id != op_id or not self.r.sealers[partition].valid(top[0].payload, top[0].seal):
            return None
        return op.state

    def pending_for(self, conn: Any, target: str, kinds: builtins.list[str]) -> str | None:
        """The id of a verified pending operation on `target`. A row that fails its seal or
        anchor (a database writer's, to block a request) is reported and does not count."""
        rows = conn.execute(select(st.operations.c.id).where(
            st.operations.c.target == target, st.operations.c.state == "PENDING",
            st.operations.c.kind.in_(kinds))).all()
        for row in rows:
            try:
                op = self.get(conn, row.id)
            except KeysvcError:
                continue  # refused and audited by `get`
            if op is not None and op.state == "PENDING" and op.target == target \
                    and op.kind in kinds:
                return op.id
        return None

    # ------------------------------------------------------------------ writes
    def insert(self, conn: Any, anchor: Any, op: OperationRecord) -> None:
        data = op.canonical()
        seal = self.r.sealers[op.partition].seal(data)
        conn.execute(st.operations.insert().values(**op.row(), seal=seal))
        anchor(f"op/{op.id}", seal, None, data)

    def update(self, conn: Any, anchor: Any, old: OperationRecord, **changes: Any
               ) -> OperationRecord:
        new = replace(old, **changes)
        sealer = self.r.sealers[old.partition]
        data = new.canonical()
        old_seal, seal = sealer.seal_many([old.canonical(), data])
        row = new.row()
        del row["id"]
        conn.execute(update(st.operations).where(st.operations.c.id == old.id)
                     .values(**row, seal=seal))
        anchor(f"op/{old.id}", seal, old_seal, data)
        return new

    def matches(self, op_id: str, data: bytes, seal: bytes) -> bool:
        return self.r.holds_exactly(st.operations, st.operations.c.id, op_id, _record, data,
                                    seal)

    def restore(self, conn: Any, op: OperationRecord, seal: bytes) -> None:
        """Start-up: the database takes the record the token's newest anchor holds."""
        conn.execute(st.operations.delete().where(st.operations.c.id == op.id))
        conn.execute(st.operations.insert().values(**op.row(), seal=seal))
