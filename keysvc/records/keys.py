"""Key records: transport, export and recipient keys (the `keys` table).

A key record says what a token object may be used for and by whom: purpose, owner, owner
type, allowed originators, algorithm, state. So it is sealed by its partition's token, its
current seal is anchored there (a DESTROYED or DISABLED key put back as ENABLED from an
older copy is refused), and before a key is used its token object is checked against it:
the object's CKA_ID must be the record's key id and its usage flags those of the purpose.
"""
from __future__ import annotations

import builtins
import datetime as dt
import json
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from pkcs11 import ObjectClass
from sqlalchemy import select, update

from keysvc import store as st
from keysvc.anchors import anchored as is_anchored
from keysvc.anchors import unpack
from keysvc.hsm import HsmKeyNotFound, HsmUnavailable
from keysvc.hsm import keys as hk
from keysvc.records.seal import canonical, decode, parse_utc

if TYPE_CHECKING:
    from keysvc.records import Records

# What each purpose's token object may do (keysvc/hsm/keys.py says why); checked on every use.
_AES_USAGE = {"EXPORT": hk.EXPORT_USAGE, "S1SP_TRANSPORT": hk.KEK_USAGE,
              "DCO_TRANSPORT": hk.KEK_USAGE}
_RSA_USAGE = {hk.A.UNWRAP: True, hk.A.DECRYPT: False, hk.A.SIGN: False}


@dataclass(frozen=True)
class KeyRecord:
    name: str
    partition: str
    purpose: str
    algorithm: str
    owner_id: str
    owner_type: str
    kcv: str
    state: str
    created_at: dt.datetime
    key_id: str
    public_key_pem: str = ""
    allowed_originators: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def placeholder(cls, name: str) -> "KeyRecord":
        """An altered record as listings show it: its name, nothing the row claims."""
        return cls(name, "", "", "", "", "", "", "", dt.datetime.min.replace(
            tzinfo=dt.timezone.utc), "")

    @property
    def is_aes(self) -> bool:
        return self.algorithm == "AES"

    def canonical(self) -> bytes:
        return canonical("key", self.name, self.partition, self.purpose, self.algorithm,
                         self.owner_id, self.owner_type, self.kcv, self.state,
                         self.created_at, self.key_id, self.public_key_pem,
                         json.dumps(list(self.allowed_originators)))

    def row(self) -> dict:
        return {"name": self.name, "partition": self.partition, "purpose": self.purpose,
                "algorithm": self.algorithm, "owner_id": self.owner_id,
                "owner_type": self.owner_type, "kcv": self.kcv, "state": self.state,
                "created_at": self.created_at, "key_id": self.key_id,
                "public_key_pem": self.public_key_pem,
                "allowed_originators": st.dumps(list(self.allowed_originators))}


def anchor_payload(op_id: str, record: bytes) -> bytes:
    """A key anchor carries the operation whose approval made the change, then the record:
    start-up rolls a key forward only if that operation's own newest anchor is APPROVED
    (the operation is anchored after the key, so otherwise the change never committed)."""
    return canonical("key-anchor", op_id, record)


def parse_anchor_payload(payload: bytes) -> tuple[str, bytes]:
    f = decode(payload)
    if len(f) != 3 or f[0] != b"key-anchor":
        raise ValueError("not a key anchor")
    return f[1].decode(), f[2]


def from_canonical(data: bytes) -> KeyRecord:
    """The record an anchor carries (`KeyRecord.canonical`), for start-up roll-forward."""
    f = [b.decode() for b in decode(data)]
    if len(f) != 13 or f[0] != "key":
        raise ValueError("not a key record")
    return KeyRecord(f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], parse_utc(f[9]),
                     f[10], f[11], tuple(json.loads(f[12])))


def _record(r: Any) -> KeyRecord:
    t = r.created_at
    return KeyRecord(r.name, r.partition, r.purpose, r.algorithm, r.owner_id, r.owner_type,
                     r.kcv, r.state, t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc),
                     r.key_id, r.public_key_pem, tuple(st.loads(r.allowed_originators)))


class Keys:
    def __init__(self, records: "Records") -> None:
        self.r = records

    # ------------------------------------------------------------------ reads
    def exists(self, conn: Any, name: str) -> bool:
        """Whether a row of this name exists (a forged one only denies the name)."""
        return conn.execute(select(st.keys.c.name).where(st.keys.c.name == name)).first() \
            is not None

    def get(self, name: str, conn: Any = None, *, for_update: bool = False,
            for_use: bool = False) -> KeyRecord | None:
        """The verified record, or None if there is no row. `for_use`: the token object is
        cross-checked too (label, CKA_ID, usage)."""
        q = select(st.keys).where(st.keys.c.name == name)
        if for_update:
            q = q.with_for_update()
        row = self.r.fetch(conn, q, f"keys/{name}")
        if row is None:
            return None
        rec = self._verified(conn, row)
        if for_use and rec.state != "DESTROYED":
            self.check_object(conn, rec)
        return rec

    def list(self, purpose: str = "") -> list[tuple[KeyRecord, bool]]:
        """Every record with whether it is intact; altered ones are listed (and audited)
        so that officers see them, in every listing: the filter is applied to verified
        records only, since an altered purpose must not hide a record from its own."""
        rows = self.r.fetch_each(st.keys, st.keys.c.name, st.keys.c.name)
        out = []
        anchored = {p: self.r.anchors(p).all() for p in self.r.sealers}
        for name, row in rows:
            if row is None:
                self.r.flag(f"keys/{name}", "is malformed")
                out.append((KeyRecord.placeholder(str(name)), False))
                continue
            try:
                rec = _record(row)
                if self.r.elsewhere(rec.partition, f"key/{rec.name}", anchored):
                    continue  # another partition's record: its own process lists it
                ok = self._seal_ok(rec, row.seal) and is_anchored(
                    anchored.get(rec.partition, {}).get(f"key/{rec.name}", []), row.seal)
            except HsmUnavailable:
                raise  # the HSM busy or down is not a record that fails its seal
            except Exception:
                ok = False
            if not ok:
                self.r.flag(f"keys/{row.name}", "fails its HSM seal or anchor")
                out.append((KeyRecord.placeholder(str(row.name)), False))
            elif not purpose or rec.purpose == purpose:
                out.append((rec, True))
        return out

    def _seal_ok(self, rec: KeyRecord, seal: bytes | None) -> bool:
        sealer = self.r.sealers.get(rec.partition)
        return sealer is not None and sealer.valid(rec.canonical(), seal)

    def _verified(self, conn: Any, row: Any) -> KeyRecord:
        where = f"keys/{row.name}"
        try:
            rec = _record(row)
        except Exception:
            raise self.r.refuse(conn, where, "is malformed") from None
        self.r.served_sealer(rec.partition, f"key/{rec.name}")  # PARTITION_NOT_SERVED
        if not self._seal_ok(rec, row.seal):
            raise self.r.refuse(conn, where, "fails its HSM seal")
        if not self.r.anchors(rec.partition).holds(f"key/{rec.name}", bytes(row.seal)):
            raise self.r.refuse(conn, where, "is not the current record (anchor)")
        return rec

    def check_object(self, conn: Any, rec: KeyRecord) -> None:
        """The token object is the one this record describes: same CKA_ID, same usage."""
        cls = ObjectClass.SECRET_KEY if rec.is_aes else ObjectClass.PRIVATE_KEY
        usage = _AES_USAGE[rec.purpose] if rec.is_aes else _RSA_USAGE
        token = self.r.partitions.tokens[rec.partition]

        def work(s):
            return hk.object_facts(s, rec.name, cls, usage)
        try:
            facts = token.run(work)
        except HsmKeyNotFound:
            raise self.r.refuse(conn, f"keys/{rec.name}",
                                "names no single token object") from None
        if facts.key_id != rec.key_id or facts.usage != {a: bool(v) for a, v in usage.items()}:
            raise self.r.refuse(conn, f"keys/{rec.name}",
                                "does not match its token object (CKA_ID or usage)")

    # ------------------------------------------------------------------ writes
    def insert(self, conn: Any, anchor: Any, rec: KeyRecord, op_id: str = "") -> None:
        """In an anchors transaction of the record's partition (`Records.anchors(p).tx`).
        `op_id`: the operation whose approval makes the key ("" for none)."""
        data = rec.canonical()
        seal = self.r.sealers[rec.partition].seal(data)
        for other in self.anchor_ops(rec.name):
            if other != op_id:  # only a crashed try of this same operation may be replaced
                raise self.r.refuse(conn, f"keys/{rec.name}", "another key of this name is "
                                    "anchored in the token")
        conn.execute(st.keys.insert().values(**rec.row(), seal=seal))
        anchor(f"key/{rec.name}", seal, None, anchor_payload(op_id, data))

    def set_state(self, conn: Any, anchor: Any, rec: KeyRecord, state: str,
                  op_id: str = "") -> KeyRecord:
        """`rec` was read verified in this transaction (for_update)."""
        new = replace(rec, state=state)
        data = new.canonical()
        old, seal = self.r.sealers[rec.partition].seal_many([rec.canonical(), data])
        conn.execute(update(st.keys).where(st.keys.c.name == rec.name)
                     .values(state=state, seal=seal))
        anchor(f"key/{rec.name}", seal, old, anchor_payload(op_id, data))
        return new

    def anchor_ops(self, name: str) -> builtins.list[str]:
        """The operations named by the anchors of key `name`, in every partition's token
        (a key name is one key across partitions)."""
        ops = []
        for p in self.r.sealers:
            a = self.r.anchors(p)
            with a.token.session() as s:
                for v in hk.data_values(s, a.label(f"key/{name}")):
                    try:
                        ops.append(parse_anchor_payload(unpack(v).payload)[0])
                    except ValueError:
                        ops.append("?")
        return ops

    def get_row_partition(self, conn: Any, name: str) -> str | None:
        return conn.execute(select(st.keys.c.partition).where(st.keys.c.name == name)).scalar()

    def matches(self, name: str, data: bytes, seal: bytes) -> bool:
        return self.r.holds_exactly(st.keys, st.keys.c.name, name, _record, data, seal)

    def restore(self, conn: Any, rec: KeyRecord, seal: bytes) -> None:
        """Start-up: the database takes the record the token's newest anchor holds."""
        conn.execute(st.keys.delete().where(st.keys.c.name == rec.name))
        conn.execute(st.keys.insert().values(**rec.row(), seal=seal))
