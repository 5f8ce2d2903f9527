"""RotateKey and DestroyKeyVersion: operations under dual control, like a key import.

Rotating makes a new version of a partition's storage key in the token, which is primary
from then on (new rows are wrapped under it) and which the rewrap job moves every older row
to. An old version is destroyed only by a second operation, only when no stored row names
it (Vault's `min_decryption_version`); the count is taken again when the operation is
approved, and the object is destroyed after the approval commits.

Decisions:
- what rotates, and what moves its users to the primary:
  - the storage keys (millions of rows): the rewrap job re-wraps every row inside the HSM;
  - the component-seal keys: pending components name their version and end with their
    operation within a day;
  - audit-mac (admin): each event's MAC names its version; events are evidence and are
    never MACed again, but no event may name an older version than one before it
    (VerifyAuditLog), so an old version, even stolen, cannot add to the chain after a
    rotation. Its versions are never destroyed (VerifyAuditLog needs them all);
  - escrow-seal (admin): each record names its version inside its seal; the rewrap job
    seals every record again under the primary, its anchor moved on with it;
- the record-seal keys do not rotate: every sealed record of every kind (stored keys,
  operations, keys, files, import jobs, anchors) would have to be sealed again; they are
  in every backup like the others;
- a new version is never destroyed because its approval failed to commit: from the moment
  it exists it is the primary and rows may already be wrapped under it. It is kept (CKA_ID
  names the operation) and the rotation can be approved again or ignored;
- the primary version cannot be destroyed.
"""
from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from keysvc import store as st
from keysvc.custody import versions
from keysvc.errors import error
from keysvc.partitions import (
    AUDIT_MAC_KEY,
    COMPONENT_SEAL_KEY,
    ESCROW_SEAL_KEY,
    LONG_LIVED,
    STORAGE_KEY,
    generate,
)

if TYPE_CHECKING:
    from keysvc.app import App
    from keysvc.identity.caller import Caller
    from keysvc.keyadmin import Operation

KINDS = ("ROTATE_KEY", "DESTROY_KEY_VERSION")
ROTATABLE = (STORAGE_KEY, COMPONENT_SEAL_KEY, AUDIT_MAC_KEY, ESCROW_SEAL_KEY)
PARTITIONS = ("s1sp", "dco")   # the partitions with a storage key (and a rewrap)
# what each key's versions are used by, as ListKeyVersions names it
USED_BY = {STORAGE_KEY: "stored keys", COMPONENT_SEAL_KEY: "pending key components",
           AUDIT_MAC_KEY: "audit events", ESCROW_SEAL_KEY: "escrow records"}


def _check(partition: str, key: str) -> None:
    if key not in LONG_LIVED.get(partition, ()):
        raise error("KEY_NOT_FOUND", f"no long-lived key {key!r} in partition {partition!r}")
    if key not in ROTATABLE:
        raise error("INVALID_REQUEST", f"{key} does not rotate: every sealed record would "
                                       "have to be sealed again (see `keysvc admin "
                                       "key-versions` for the keys that do)")


def key_versions(app: App, partition: str, key: str = STORAGE_KEY) -> list[int]:
    with app.partitions.tokens[partition].session() as s:
        return versions.versions(s, key)


def rows_by_version(app: App, partition: str) -> dict[int, int]:
    from keysvc.custody.rewrap import stored_keys
    return stored_keys(app, partition).count_by_version()


def pending_components_by_version(app: App, partition: str) -> dict[int, int]:
    """Officers' components waiting in pending operations of the partition, by the
    component-seal version that seals them (they end with their operation)."""
    from keysvc.keyadmin import OPERATION_TTL, component_version
    out: dict[int, int] = {}
    now = app.clock()
    for op, ok in app.records.operations.list():
        if not ok or op.state != "PENDING" or op.partition != partition \
                or op.created_at + OPERATION_TTL < now:  # expired: never approved now
            continue
        for c in op.payload.get("components", []) or []:
            v = component_version(str(c.get("sealed", "")))
            out[v] = out.get(v, 0) + 1
    return out


def in_use(app: App, partition: str, key: str) -> dict[int, int]:
    """What uses each version of `key` (USED_BY)."""
    if key == STORAGE_KEY:
        return rows_by_version(app, partition)
    if key == COMPONENT_SEAL_KEY:
        return pending_components_by_version(app, partition)
    if key == AUDIT_MAC_KEY:
        return app.audit.count_by_mac_version(key_versions(app, partition, key))
    if key == ESCROW_SEAL_KEY:
        return app.records.escrows.count_by_version()
    return {}


def request_rotation(app: App, caller: Caller, partition: str, key: str) -> Operation:
    from keysvc import keyadmin
    _check(partition, key)
    return keyadmin._new_operation(app, caller, "op-" + uuid.uuid4().hex[:16], "ROTATE_KEY",
                                   f"{partition}/{key}", partition,
                                   {"partition": partition, "key": key})


def _destroy_refusal(app: App, partition: str, key: str, version: int) -> tuple[str, str]:
    """(code, why) this version may not be destroyed now, or ("", "")."""
    present = key_versions(app, partition, key)
    if version not in present:
        return "KEY_NOT_FOUND", f"{key} has no version {version}"
    if version == present[-1]:
        return "KEY_VERSION_IN_USE", f"version {version} is the primary: rotate first"
    if key == AUDIT_MAC_KEY:
        # Every version that was primary MACed events, and events are never deleted; a
        # count of them is the database's word, which a writer could make 0.
        return "KEY_VERSION_IN_USE", ("audit-mac versions are never destroyed: the audit "
                                      "trail is kept as it was written, and VerifyAuditLog "
                                      "needs every version that MACed it")
    if key == ESCROW_SEAL_KEY:
        # The token's anchors, not the database's count, say which records exist.
        unsettled = app.records.escrows.not_on(present[-1])
        if unsettled:
            return "KEY_VERSION_IN_USE", (
                f"{len(unsettled)} escrow records are not yet sealed under the primary "
                f"escrow-seal version {present[-1]} (e.g. {sorted(unsettled)[0]}): wait for "
                "the rewrap; an altered or missing record keeps every older version")
    rows = in_use(app, partition, key).get(version, 0)
    if rows:
        wait = {STORAGE_KEY: "wait for the rewrap",
                COMPONENT_SEAL_KEY: "wait for their operations to end",
                ESCROW_SEAL_KEY: "wait for the rewrap to seal them again",
                AUDIT_MAC_KEY: "the audit trail is kept as it was written"}[key]
        return "KEY_VERSION_IN_USE", (f"{rows} {USED_BY[key]} still use version {version} "
                                      f"of {key}: {wait}")
    # The count is the database's word: a writer could hide rows while it is taken. A
    # version is destroyed only once a backup holds it, so hidden rows stay recoverable.
    from keysvc.custody.backup import last_backup
    backed = (last_backup(app.partitions.tokens[partition]) or {}).get("versions", {})
    for v in (version, present[-1]):  # and the primary, which holds every row now
        if v not in backed.get(key, []):
            return "VERSION_NOT_BACKED_UP", (f"version {v} of {key} is in no backup: run "
                                             "`keysvc admin backup` first")
    return "", ""


def request_destroy_version(app: App, caller: Caller, partition: str, key: str,
                            version: int) -> Operation:
    from keysvc import keyadmin
    _check(partition, key)
    code, why = _destroy_refusal(app, partition, key, version)
    if code:
        raise error(code, why)
    return keyadmin._new_operation(app, caller, "op-" + uuid.uuid4().hex[:16],
                                   "DESTROY_KEY_VERSION", versions.label(key, version),
                                   partition, {"partition": partition, "key": key,
                                               "version": version})


def execute(app: App, conn: Any, op: Any, p: dict, effects: Any) -> tuple[str, str, str]:
    """Carry out an approved ROTATE_KEY or DESTROY_KEY_VERSION (keyadmin._execute)."""
    partition, key = p["partition"], p["key"]
    if partition != op.partition:
        raise app.records.refuse(None, f"operations/{op.id}", "names a key of another "
                                                              "partition")
    token = app.partitions.tokens[partition]
    if op.kind == "ROTATE_KEY":
        st.serialise(conn, f"rotate:{partition}/{key}")  # one rotation at a time, replicas too
        return "APPROVED", f"version {_new_version(token, key, op.id)} of {key} is primary", ""
    version = int(p["version"])
    code, why = _destroy_refusal(app, partition, key, version)
    if code:
        return "REJECTED", why, code
    effects.to_destroy.append((token, versions.label(key, version)))
    return "APPROVED", f"version {version} of {key} destroyed", ""


def _new_version(token: Any, key: str, op_id: str) -> int:
    """Make the next version. Rotations are serialised in the database (`execute`); should
    two still pick one number (a token that shows another process's new object late), the
    one that finds its label held twice gives its object up and takes the next number."""
    from keysvc.hsm import keys as hk
    for _ in range(5):
        with token.session() as s:
            new = versions.versions(s, key)[-1] + 1
            label = versions.label(key, new)
            generate(s, label, key_id=op_id)
            if len(hk.objects(s, {hk.A.LABEL: label,
                                  hk.A.CLASS: hk.ObjectClass.SECRET_KEY})) == 1:
                versions.made(key)
                return new
            hk.destroy_with_id(s, label, op_id)
    raise error("KEY_ROTATED", "another rotation of this key runs at the same time: approve "
                               "again")


def view(app: App, op: Any, shown: dict, warnings: list[str]) -> None:
    """What the approving officer reads, and what to look at twice."""
    from keysvc.custody.backup import last_backup
    p = op.request
    partition, key = p.get("partition", ""), p.get("key", "")
    shown["name"] = op.target
    shown["algorithm"] = "AES-256"
    try:
        present = key_versions(app, partition, key)
        backed = (last_backup(app.partitions.tokens[partition]) or {}).get(
            "versions", {}).get(key, [])
    except Exception:
        warnings.append("the token cannot be read to show the key's versions")
        return
    shown["reason"] = f"versions now {present}; backed up {backed or 'never'}"
    if op.kind == "ROTATE_KEY":
        warnings.append(f"the new version {present[-1] + 1 if present else 1} will have no "
                        "backup until the next backup ceremony")
    else:
        warnings.append("destruction is final")
        if present and present[-1] not in backed:
            warnings.append(f"the primary version {present[-1]} has no backup: if the "
                            "token is lost after this, every stored key is lost with it")


# --------------------------------------------------------------------------- status
@dataclass(frozen=True)
class VersionInfo:
    partition: str
    key: str
    version: int
    primary: bool
    stored_keys: int
    backed_up: bool


@dataclass(frozen=True)
class RewrapInfo:
    partition: str
    remaining: int
    done: int
    rows_per_second: float
    flagged: int


@dataclass(frozen=True)
class BackupInfo:
    partition: str
    backup_id: str
    time: dt.datetime | None


@dataclass(frozen=True)
class Status:
    versions: list[VersionInfo]
    rewrap: list[RewrapInfo]
    backups: list[BackupInfo]


def status(app: App, partition: str = "") -> Status:
    """Every long-lived key version of the partition(s), rows per storage-key version, the
    rewrap's progress (this process's job, if it runs one) and the last backup."""
    from keysvc.custody.backup import last_backup
    out, rewrap, backups = [], [], []
    job = getattr(app, "rewrap", None)
    for p in ([partition] if partition else list(app.partitions.served)):
        token = app.partitions.tokens[p]
        with token.session() as s:
            found = versions.all_versions(s, LONG_LIVED[p])
        last = last_backup(token) or {}
        backed = last.get("versions", {})
        rows = rows_by_version(app, p) if p in PARTITIONS else {}
        for key, vs in found.items():
            used = rows if key == STORAGE_KEY else \
                in_use(app, p, key) if key in ROTATABLE else {}
            for v in vs:
                out.append(VersionInfo(p, key, v, v == vs[-1], used.get(v, 0),
                                       v in backed.get(key, [])))
        if p in PARTITIONS:
            primary = found[STORAGE_KEY][-1] if found.get(STORAGE_KEY) else 0
            prog = job.progress[p] if job is not None else None
            rewrap.append(RewrapInfo(p, sum(n for v, n in rows.items() if v < primary),
                                     prog.done if prog else 0,
                                     prog.rows_per_second if prog else 0.0,
                                     prog.flagged if prog else 0))
        when = last.get("time")
        backups.append(BackupInfo(p, last.get("backup_id", ""),
                                  dt.datetime.fromisoformat(when) if when else None))
    return Status(out, rewrap, backups)
