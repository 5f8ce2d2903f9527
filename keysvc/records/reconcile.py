"""At start: the database and the tokens agree again after a crash, on the token's word.

The token and the database cannot commit together. keysvc orders its changes so that the
token always knows at least as much as the database:
- a changing record (key, operation) anchors its new seal, a generation newer, with the
  whole new record, before the commit (keysvc/anchors.py), and an approval anchors the
  keys it changes before the operation itself. The newest anchor of an operation is the
  truth: the database is rolled forward to it. The newest anchor of a key is the truth only
  if the operation that made it is APPROVED in its own newest anchor (an upgrade's or a
  registration's anchor names none); otherwise that change never committed, and its anchor
  goes. Every decision is taken from anchors whose seals verify in the HSM, never from
  database rows, and every anchor removed or record rolled forward is audited;
- every key object an operation makes carries that operation's id in CKA_ID. One whose
  record names it is kept; one whose operation is verifiably not APPROVED was made by an
  approval that never committed, and is destroyed; the object of a DESTROYED key is
  destroyed (its destruction runs after the commit); anything else is kept and reported:
  key material is never destroyed on the database's word alone. Each decision is taken
  under the operation's row lock, so an approval running on another replica is waited for;
- an import job's row commits before its RSA pair is made: a pair (CKA_ID = its job's id)
  whose job has no row was left by a deleted row, and is destroyed.
One record that cannot be reconciled is reported and left; it never stops the start.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError

from keysvc.anchors import Anchored, newest, unpack
from keysvc.custody import versions
from keysvc.errors import KeysvcError
from keysvc.hsm import keys as hk
from keysvc.partitions import KIND
from keysvc.records import SEALING_PARTITIONS, Records
from keysvc.records.import_jobs import LABEL_PREFIX
from keysvc.records.keys import KeyRecord, parse_anchor_payload
from keysvc.records.keys import from_canonical as key_from
from keysvc.records.operations import OperationRecord
from keysvc.records.operations import from_canonical as operation_from

log = logging.getLogger("keysvc.records.reconcile")


@dataclass
class Reconciled:
    rolled_forward: int = 0
    discarded: int = 0
    kept: int = 0
    destroyed: int = 0
    orphan_pairs: int = 0
    reported: int = 0


def reconcile(records: Records) -> Reconciled:
    out = Reconciled()
    for partition in SEALING_PARTITIONS:
        if not records.serves(partition):
            continue  # reconciled by the process that serves it
        _anchored_records(records, partition, out)
        _objects(records, partition, out)
    if out != Reconciled(kept=out.kept):
        log.warning("reconciled the tokens with the records: %s", out)
    return out


def _newest_sealed(records: Records, partition: str, values: list[bytes],
                   record_of=lambda payload: payload) -> Anchored | None:
    """The newest anchor, if there is one and the record it carries seals to its seal."""
    top = newest(values)
    if len(top) != 1:
        return None
    try:
        record = record_of(top[0].payload)
    except ValueError:
        return None
    return top[0] if records.sealers[partition].valid(record, top[0].seal) else None


def _anchored_records(records: Records, partition: str, out: Reconciled) -> None:
    anchors = records.anchors(partition)
    everything = anchors.all()
    approved: dict[str, OperationRecord] = {}
    for rid in sorted(everything, key=lambda r: not r.startswith("op/")):  # operations first
        try:
            if rid.startswith("op/"):
                op = _operation(records, partition, rid, everything[rid], out)
                if op is not None and op.state == "APPROVED":
                    approved[op.id] = op
            elif rid.startswith("key/"):
                _key(records, partition, rid, everything[rid], approved, out)
        except Exception as exc:  # one record never stops the start
            records.flag(f"token/{partition}/{rid}", f"not reconciled ({type(exc).__name__})")
            out.reported += 1


class _Moved(Exception):
    """The record's anchors changed while start-up waited for its row: a change running
    elsewhere decided it (and, had it failed, removed its anchors before letting go)."""


def _still_newest(records: Records, partition: str, rid: str, a: Anchored) -> None:
    if records.anchors(partition).newest(rid) != [a]:
        raise _Moved(rid)


def _operation(records: Records, partition: str, rid: str, values: list[bytes],
               out: Reconciled) -> OperationRecord | None:
    """Roll the operation forward to its newest anchor; returns that record."""
    a = _newest_sealed(records, partition, values)
    if a is None:
        records.flag(f"token/{partition}/{rid}", "its anchors do not name one sealed record")
        out.reported += 1
        return None
    op = operation_from(a.payload)
    if not records.operations.matches(op.id, a.payload, a.seal):
        try:
            with records.audited("record.rolled_forward", f"operations/{op.id}: {op.kind} "
                                 f"{op.target} ({op.state}) by {op.requested_by}, rolled "
                                 "forward to the token's newest anchor"):
                with records.store.tx() as conn:
                    records.operations.restore(conn, op, a.seal)  # waits for a writer of it
                    _still_newest(records, partition, rid, a)
        except (_Moved, IntegrityError):
            return None  # decided elsewhere meanwhile: the next start looks again
        log.warning("operation %s rolled forward to the token's newest anchor", op.id)
        out.rolled_forward += 1
    _settle(records, partition, rid, values, a)
    return op


_STATE_OF = {"IMPORT_TRANSPORT_KEY": "ENABLED", "GENERATE_RECIPIENT_KEY": "ENABLED",
             "DISABLE_KEY": "DISABLED", "ENABLE_KEY": "ENABLED", "DESTROY_KEY": "DESTROYED"}


def _approves(op: OperationRecord | None, rec: KeyRecord, partition: str) -> bool:
    """Is this the change `op` approved: its key, its partition, the state its kind makes
    (and, for a new key, the key id it gives)?"""
    if op is None or op.target != rec.name or op.partition != partition:
        return False
    if op.kind in ("IMPORT_TRANSPORT_KEY", "GENERATE_RECIPIENT_KEY") and rec.key_id != op.id:
        return False
    return _STATE_OF.get(op.kind) == rec.state


def _key(records: Records, partition: str, rid: str, values: list[bytes],
         approved: dict[str, OperationRecord], out: Reconciled) -> None:
    anchors = records.anchors(partition)
    while values:
        a = _newest_sealed(records, partition, values, lambda p: parse_anchor_payload(p)[1])
        if a is None:
            records.flag(f"token/{partition}/{rid}", "its anchors do not name one sealed "
                                                     "record")
            out.reported += 1
            return
        op_id, data = parse_anchor_payload(a.payload)
        rec = key_from(data)
        if op_id and not _approves(approved.get(op_id), rec, partition):
            # The approval that anchored this never anchored its operation as APPROVED
            # (the operation is anchored after its keys), so it never committed: its
            # anchor goes, the one before it (if any) stays.
            value = next(v for v in values if unpack(v) == a)
            with anchors.token.session() as s:
                hk.destroy_data(s, anchors.label(rid), lambda v: v == value)
            values = [v for v in values if v != value]
            records.flag(f"token/{partition}/{rid}", f"anchor of an approval of {op_id} that "
                                                     "never committed; removed")
            out.discarded += 1
            continue
        if not records.keys.matches(rec.name, data, a.seal):
            try:
                with records.audited("record.rolled_forward", f"keys/{rec.name}: "
                                     f"{rec.state} ({op_id or 'no operation'}), rolled "
                                     "forward to the token's newest anchor"):
                    with records.store.tx() as conn:
                        existing = records.keys.get_row_partition(conn, rec.name)
                        if existing not in (None, rec.partition):
                            raise records.refuse(conn, f"keys/{rec.name}", "the database "
                                                 "holds a key of this name in another "
                                                 "partition")
                        records.keys.restore(conn, rec, a.seal)  # waits for a writer of it
                        _still_newest(records, partition, rid, a)
            except (_Moved, IntegrityError):
                return
            log.warning("key %s rolled forward to the token's newest anchor", rec.name)
            out.rolled_forward += 1
        _settle(records, partition, rid, values, a)
        return


def _settle(records: Records, partition: str, rid: str, values: list[bytes],
            a: Anchored) -> None:
    if len(values) > 1:
        records.anchors(partition).settle(rid, next(v for v in values if unpack(v) == a))


def _objects(records: Records, partition: str, out: Reconciled) -> None:
    token = records.partitions.tokens[partition]
    with token.session() as s:
        objects = hk.objects_with_ids(s)
    jobs = records.import_jobs.ids(partition)
    seen: set[tuple[str, str]] = set()
    for label, _cls, key_id in objects:
        if (label, key_id) in seen:
            continue  # the two halves of an RSA pair
        seen.add((label, key_id))
        try:
            _object(records, partition, token, label, key_id, jobs, out)
        except Exception as exc:
            records.flag(f"token/{partition}/{label}", f"not reconciled ({type(exc).__name__})")
            out.reported += 1


def _object(records: Records, partition: str, token, label: str, key_id: str,
            jobs: set[str], out: Reconciled) -> None:
    if label.startswith(LABEL_PREFIX):
        job_id = label[len(LABEL_PREFIX):]
        if job_id not in jobs and key_id in (job_id, ""):
            with token.session() as s:
                hk.destroy_with_id(s, label, key_id)
            out.orphan_pairs += 1
        return
    if not key_id.startswith("op-") or versions.parse(label)[0] in KIND:
        return  # a long-lived key's version (custody/rotation.py): never from a record
    # Under the operation's row lock: an approval running elsewhere holds it until it ends.
    with records.store.tx() as conn:
        try:
            op = records.operations.get(conn, key_id, for_update=True)
        except KeysvcError:
            op = None
        try:
            rec = records.keys.get(label, conn)
        except KeysvcError:
            rec = None
        if rec is not None and rec.key_id == key_id:
            if rec.state == "DESTROYED":  # destroyed after a commit that a crash cut short
                with token.session() as s:
                    hk.destroy_with_id(s, label, key_id)
                out.destroyed += 1
            else:
                out.kept += 1
            return
        if op is not None and op.state != "APPROVED" and op.target == label:
            with token.session() as s:
                hk.destroy_with_id(s, label, key_id)
            out.destroyed += 1
            return
    records.flag(f"token/{partition}/{label}", f"object {key_id} has no record that "
                                               "accounts for it; kept")
    out.reported += 1
