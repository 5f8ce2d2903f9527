"""The one-time upgrade to sealed records: rows that exist before it are trusted once.

Alembic (revision 0002) adds the seal columns; sealing needs the HSM, so it happens at the
first start after that, here. A data object in the admin token marks the token set as
upgraded, and from then on nothing is ever sealed on the database's word again: an unsealed
row is refused like a forged one. (A marker in the database would let whoever writes the
database ask for a fresh trust-on-first-use.)

What the upgrade does with each table:
- keys: sealed and anchored; each token object gets the record's key id as CKA_ID;
- operations: final ones are sealed as they are; PENDING ones become EXPIRED (their
  approvals and sealed components predate approval statements): officers ask again;
- import jobs, stored device and master keys, stored file results: sealed as they are;
- escrow records: anchored under this database's anchors (`escrow.reanchor_legacy`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any, Callable

from pkcs11 import ObjectClass
from sqlalchemy import select, update

from keysvc import store as st
from keysvc.hsm import keys as hk
from keysvc.records import Records
from keysvc.records.import_jobs import _record as job_record
from keysvc.records.keys import _record as key_record
from keysvc.records.keys import anchor_payload
from keysvc.records.operations import Approval, OperationRecord, _approvals_json, approval_statement

log = logging.getLogger("keysvc.records.upgrade")
MARKER = "keysvc-records-sealed-v2"
PURPOSE_PARTITION = {"S1SP_TRANSPORT": "s1sp", "EXPORT": "s1sp", "DCO_TRANSPORT": "dco"}


def upgrade_once(records: Records, also: Callable[[], int] = lambda: 0) -> bool:
    """Seal every unsealed row, once per token set; returns whether it ran now."""
    admin = records.partitions.admin
    with admin.session() as s:
        if hk.data_values(s, MARKER):
            return False
    if any(not records.serves(p) for p in ("s1sp", "dco", "admin")) and _any_unsealed(records):
        # Sealing needs each record's own partition: one start with every partition does it.
        raise SystemExit("the one-time upgrade to sealed records needs every partition's "
                         "token: start once with --partitions s1sp,dco,admin")
    n = (_keys(records) + _operations(records) + _import_jobs(records)
         + _stored(records, records.device_keys) + _stored(records, records.master_keys)
         + _files(records) + also())
    with admin.session() as s:
        hk.put_data(s, MARKER, b"1")
    if n:
        log.warning("upgrade: sealed %d existing records; they are trusted from now on", n)
    return True


def _any_unsealed(records: Records) -> bool:
    with records.store.engine.connect() as conn:
        return any(conn.execute(select(t.c.seal).where(t.c.seal.is_(None)).limit(1)).first()
                   for t in (st.keys, st.operations, st.import_jobs, st.device_keys,
                             st.master_keys, st.migration_files))


def _unsealed(conn: Any, table: Any) -> list:
    return conn.execute(select(table).where(table.c.seal.is_(None))).all()


def _keys(records: Records) -> int:
    with records.store.engine.connect() as conn:
        rows = _unsealed(conn, st.keys)
    for row in rows:
        key_id = row.key_id or f"legacy-{row.name}"[:64]
        rec = replace(key_record(row), key_id=key_id)
        if rec.state != "DESTROYED":
            with records.partitions.tokens[rec.partition].session() as s:
                hk.set_id(s, rec.name, key_id)
        seal = records.sealers[rec.partition].seal(rec.canonical())
        with records.anchors(rec.partition).tx(records.store) as (conn, anchor):
            conn.execute(update(st.keys).where(st.keys.c.name == rec.name)
                         .values(key_id=key_id, seal=seal))
            anchor(f"key/{rec.name}", seal, None, anchor_payload("", rec.canonical()))
    return len(rows)


def _operations(records: Records) -> int:
    with records.store.engine.connect() as conn:
        rows = _unsealed(conn, st.operations)
        key_partitions = {r.name: r.partition for r in conn.execute(
            select(st.keys.c.name, st.keys.c.partition))}
    for row in rows:
        payload = json.loads(row.payload)
        partition = PURPOSE_PARTITION.get(payload.get("purpose", ""),
                                          key_partitions.get(row.target, "s1sp"))
        officers = [a if isinstance(a, str) else a.get("officer", "")
                    for a in json.loads(row.approvals)]
        state, message = row.state, row.message
        if state == "PENDING":
            state, message = "EXPIRED", "expired at the upgrade to sealed records"
            payload.pop("components", None)
        op = OperationRecord(row.id, partition, row.kind, row.target, state,
                             row.requested_by, (), payload, message, row.created_at,
                             row.updated_at)
        sealer = records.sealers[partition]
        approvals = tuple(Approval(o, op.digest, sealer.seal(
            approval_statement(op.id, o, "", op.digest))) for o in officers)
        op = replace(op, approvals=approvals)
        seal = sealer.seal(op.canonical())
        with records.anchors(partition).tx(records.store) as (conn, anchor):
            conn.execute(update(st.operations).where(st.operations.c.id == op.id).values(
                partition=partition, state=state, message=message,
                approvals=_approvals_json(approvals), payload=st.dumps(payload), seal=seal))
            anchor(f"op/{op.id}", seal, None, op.canonical())
    return len(rows)


def _import_jobs(records: Records) -> int:
    with records.store.tx() as conn:
        rows = _unsealed(conn, st.import_jobs)
        for row in rows:
            job = job_record(row)
            with records.partitions.tokens[job.partition].session() as s, \
                    s.store.exclusive():
                for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                    for o in s.raw.get_objects({hk.A.LABEL: job.label, hk.A.CLASS: cls}):
                        o[hk.A.ID] = job.id.encode()
            conn.execute(update(st.import_jobs).where(st.import_jobs.c.id == job.id).values(
                seal=records.sealers[job.partition].seal(job.canonical())))
    return len(rows)


def _stored(records: Records, repo: Any) -> int:
    n = 0
    while True:
        with records.store.tx() as conn:
            rows = conn.execute(select(repo.table).where(repo.table.c.seal.is_(None))
                                .limit(2000)).all()
            if not rows:
                return n
            keys = [repo._stored(r) for r in rows]
            seals = records.sealers[repo.partition].seal_many(repo.canonical(k) for k in keys)
            for r, seal in zip(rows, seals):
                where = [repo.table.c.device_id == r.device_id]
                if "role" in repo.table.c:
                    where += [repo.table.c.role == r.role, repo.table.c.name == r.name]
                conn.execute(update(repo.table).where(*where).values(seal=seal))
            n += len(rows)


def _files(records: Records) -> int:
    from keysvc.records.files import _canonical
    with records.store.tx() as conn:
        rows = _unsealed(conn, st.migration_files)
        for r in rows:
            seal = records.sealers[r.service].seal(
                _canonical(r.file_id, r.service, r.digest, r.result))
            conn.execute(update(st.migration_files).where(
                st.migration_files.c.file_id == r.file_id,
                st.migration_files.c.service == r.service).values(seal=seal))
    return len(rows)
