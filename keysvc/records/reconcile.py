"""At start: token objects and records agree again after a crash.

The token and the database cannot commit together, so keysvc orders its changes (a key is
made before the commit that records it; an import job's row commits before its pair is
made) and every key object an operation makes carries that operation's id in CKA_ID. A
crash between the two halves leaves an object no record accounts for. Here:
- a key object whose record exists with the same key id is kept;
- one whose operation is verifiably not APPROVED (its sealed record says so, and it has one
  anchor, not the two a crash around its own change leaves) was made by an approval that
  never committed, and is destroyed;
- anything else is kept and reported (audited): key material is never destroyed on the
  database's word alone, since whoever writes the database could delete the record;
- an import-job pair whose job has no row is destroyed (a job's row commits first, so only
  a deleted row leaves one; its key pair protects nothing yet);
- anchors left by a change that did not commit are removed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from hsm import keys as hk
from keysvc.errors import KeysvcError
from keysvc.records import SEALING_PARTITIONS, Records
from keysvc.records.import_jobs import LABEL_PREFIX

log = logging.getLogger("keysvc.records.reconcile")


@dataclass
class Reconciled:
    kept: int = 0
    destroyed: int = 0
    orphan_pairs: int = 0
    reported: int = 0
    anchors_removed: int = 0


def reconcile(records: Records) -> Reconciled:
    out = Reconciled()
    for partition in SEALING_PARTITIONS:
        _partition(records, partition, out)
    if out.destroyed or out.orphan_pairs or out.reported or out.anchors_removed:
        log.warning("reconciled the tokens with the records: %s", out)
    return out


def _partition(records: Records, partition: str, out: Reconciled) -> None:
    token = records.partitions.tokens[partition]
    with token.session() as s:
        objects = hk.objects_with_ids(s)
    jobs = records.import_jobs.ids(partition)
    anchored = records.anchors(partition).all()
    seen: set[tuple[str, str]] = set()
    for label, _cls, key_id in objects:
        if (label, key_id) in seen:
            continue  # the two halves of an RSA pair
        seen.add((label, key_id))
        if label.startswith(LABEL_PREFIX):
            if label[len(LABEL_PREFIX):] not in jobs:
                with token.session() as s:
                    hk.destroy_objects(s, label)
                out.orphan_pairs += 1
            continue
        if not key_id.startswith("op-"):
            continue
        try:
            rec = records.keys.get(label)
        except KeysvcError:
            rec = None
        if rec is not None and rec.key_id == key_id:
            out.kept += 1
            continue
        try:
            with records.store.engine.connect() as conn:
                op = records.operations.get(conn, key_id)
        except KeysvcError:
            op = None
        # Two anchors for the operation mean a crash around one of its changes: which of
        # the two committed is then the database's word alone, so the object is kept.
        single = len(anchored.get(f"op/{key_id}", [])) == 1
        if op is not None and op.state != "APPROVED" and op.target == label and single:
            with token.session() as s:
                hk.destroy_with_id(s, label, key_id)
            out.destroyed += 1
        else:
            records.flag(f"token/{partition}/{label}", f"object {key_id} has no record "
                         "that accounts for it; kept")
            out.reported += 1
    out.anchors_removed += _stale_anchors(records, partition)


def _stale_anchors(records: Records, partition: str) -> int:
    """A record with more than one anchored seal: keep the one its row has (a crash after
    a new anchor and before its commit leaves the old and the new)."""
    anchors = records.anchors(partition)
    n = 0
    for rid, values in anchors.all().items():
        if len(values) < 2:
            continue
        current = records.current_seal(rid)
        if current is None or not any(v[:len(current)] == current for v in values):
            continue  # nothing to go by: leave them
        with token_session(records, partition) as s:
            hk.destroy_data(s, anchors.label(rid), lambda v: v[:len(current)] != current)
        n += len(values) - 1
    return n


def token_session(records: Records, partition: str):
    return records.partitions.tokens[partition].session()
