"""At start: the database and the tokens agree again after a crash, on the token's word.

The token and the database cannot commit together. keysvc orders its changes so that the
token always knows at least as much as the database:
- a changing record (key, operation) anchors its new seal, a generation newer, with the
  whole new record, before the commit (keysvc/anchors.py). The newest anchor is the truth:
  if the database does not hold it (a crash before or after the commit, or an older copy
  put back), the database is rolled forward to it here, and older anchors are removed. A
  new key whose creating operation is not APPROVED (the approval never committed) is not
  rolled forward; its anchor goes;
- every key object an operation makes carries that operation's id in CKA_ID. One whose
  record names it is kept; one whose operation is verifiably not APPROVED was made by an
  approval that never committed, and is destroyed; the object of a DESTROYED key is
  destroyed (its destruction runs after the commit); anything else is kept and reported
  (audited): key material is never destroyed on the database's word alone;
- an import job's row commits before its RSA pair is made: a pair (CKA_ID = its job's id)
  whose job has no row was left by a deleted row, and is destroyed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from hsm import keys as hk
from keysvc.anchors import newest, unpack
from keysvc.errors import KeysvcError
from keysvc.records import SEALING_PARTITIONS, Records
from keysvc.records.import_jobs import LABEL_PREFIX
from keysvc.records.keys import from_canonical as key_from
from keysvc.records.operations import from_canonical as operation_from

log = logging.getLogger("keysvc.records.reconcile")


@dataclass
class Reconciled:
    rolled_forward: int = 0
    kept: int = 0
    destroyed: int = 0
    orphan_pairs: int = 0
    reported: int = 0


def reconcile(records: Records) -> Reconciled:
    out = Reconciled()
    for partition in SEALING_PARTITIONS:
        _roll_forward(records, partition, "op/", out)   # operations first: a new key
        _roll_forward(records, partition, "key/", out)  # depends on its operation
        _objects(records, partition, out)
    if out != Reconciled(kept=out.kept):
        log.warning("reconciled the tokens with the records: %s", out)
    return out


def _roll_forward(records: Records, partition: str, kind: str, out: Reconciled) -> None:
    anchors = records.anchors(partition)
    sealer = records.sealers[partition]
    for rid, values in anchors.all().items():
        if not rid.startswith(kind):
            continue
        top = newest(values)
        if len(top) != 1 or not sealer.valid(top[0].payload, top[0].seal):
            records.flag(f"token/{partition}/{rid}", "its anchors do not name one sealed "
                                                     "record; left as they are")
            continue
        a = top[0]
        keep = next(v for v in values if unpack(v) == a)
        if records.current_seal(rid) != a.seal:
            if not _restore(records, kind, a, anchors, rid):
                continue
            out.rolled_forward += 1
            records.flag(f"{'keys' if kind == 'key/' else 'operations'}/{rid[len(kind):]}",
                         "rolled forward to the token's newest anchor")
        if len(values) > 1:
            anchors.settle(rid, keep)


def _restore(records: Records, kind: str, a: Any, anchors: Any, rid: str) -> bool:
    """Write the anchored record into the database; False if it must not be."""
    if kind == "op/":
        op = operation_from(a.payload)
        with records.store.tx() as conn:
            records.operations.restore(conn, op, a.seal)
        return True
    rec = key_from(a.payload)
    if a.generation == 1 and rec.key_id.startswith("op-"):
        # A new key: only if the approval that made it committed (its operation is
        # APPROVED, itself rolled forward first); else its creation never happened.
        try:
            with records.store.engine.connect() as conn:
                op = records.operations.get(conn, rec.key_id)
        except KeysvcError:
            op = None
        if op is None or op.state != "APPROVED":
            with anchors.token.session() as s:
                hk.destroy_data(s, anchors.label(rid))
            return False
    with records.store.tx() as conn:
        records.keys.restore(conn, rec, a.seal)
    return True


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
        if label.startswith(LABEL_PREFIX):
            job_id = label[len(LABEL_PREFIX):]
            if job_id not in jobs and key_id in (job_id, ""):
                with token.session() as s:
                    hk.destroy_with_id(s, label, key_id)
                out.orphan_pairs += 1
            continue
        if not key_id.startswith("op-"):
            continue
        try:
            rec = records.keys.get(label)
        except KeysvcError:
            rec = None
        if rec is not None and rec.key_id == key_id:
            if rec.state == "DESTROYED":  # destroyed after a commit that a crash cut short
                with token.session() as s:
                    hk.destroy_with_id(s, label, key_id)
                out.destroyed += 1
            else:
                out.kept += 1
            continue
        try:
            with records.store.engine.connect() as conn:
                op = records.operations.get(conn, key_id)
        except KeysvcError:
            op = None
        if op is not None and op.state != "APPROVED" and op.target == label:
            with token.session() as s:
                hk.destroy_with_id(s, label, key_id)
            out.destroyed += 1
        else:
            records.flag(f"token/{partition}/{label}", f"object {key_id} has no record "
                         "that accounts for it; kept")
            out.reported += 1
