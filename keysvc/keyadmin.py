"""Key ceremonies under dual control (api.md, KeyAdministrationService).

Every change to key material is an Operation: created PENDING by one security officer,
effective once `quorum` distinct officers (the requester counts as the first) have
approved. Nothing usable exists before that: a pending import has no `keys` row and no
token object, so a file naming it fails UNKNOWN_TRANSPORT_KEY.

Clear key components are sealed with AES-GCM under the partition's storage key inside the
HSM while they wait for the other officers; they are in process memory only while they
are sealed, and again for the moment they are XORed and turned into a token object.
"""
from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.cmac import CMAC

from keysvc import faults, officers
from keysvc import store as st
from keysvc.app import App, Caller
from keysvc.custody import rotation, versions
from keysvc.errors import KeysvcError, error
from keysvc.hsm import HsmKeyNotFound, HsmOperationFailed
from keysvc.hsm import keys as hk
from keysvc.partitions import COMPONENT_SEAL_KEY, PURPOSE_PARTITION
from keysvc.records.import_jobs import ImportJobRecord
from keysvc.records.keys import KeyRecord
from keysvc.records.operations import OperationRecord, officer_name
from keysvc.transport import expected_kcv_of

PURPOSES = ("S1SP_TRANSPORT", "DCO_TRANSPORT", "EXPORT")
OWNER_TYPES = ("SMSO", "REQUESTING_PARTY", "S1SP")
OPERATION_TTL = dt.timedelta(hours=24)
PARTITIONS_WITH_KEYS = ("s1sp", "dco")
# keysvc's own token objects: a key may not be named like one (reconciliation and
# destruction go by label).
# Names, owners and originators an approver reads on a screen: letters, digits, ".", "_"
# and "-", 1-64 characters. No control character, markup, space or look-alike script can
# then make a request read as another one.
_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RESERVED_LABELS = ("storage-key", "component-seal", "record-seal", "audit-mac", "escrow-seal")
RESERVED_PREFIXES = ("import-job:", "rec:", "escrow-anchor:", "audit-checkpoint:", "keysvc-")
log = logging.getLogger("keysvc.keyadmin")


@dataclass(frozen=True)
class Operation:
    operation_id: str
    kind: str
    target: str
    state: str
    requested_by: str
    approved_by: tuple[str, ...]
    quorum: int
    message: str
    created_at: dt.datetime
    seal_intact: bool = True   # False: the record fails its HSM seal or anchor (listed, inert)
    # What the officers approve (every field of the request, the key as it is now for state
    # changes, warnings) and its digest, which an approval must name (REQUEST_CHANGED).
    request: dict = field(default_factory=dict)
    request_digest: str = ""


@dataclass(frozen=True)
class KeyInfo:
    name: str
    purpose: str
    owner_id: str
    owner_type: str
    algorithm: str
    kcv: str
    state: str
    created_at: dt.datetime
    public_key_pem: str = ""
    allowed_originators: tuple[str, ...] = field(default_factory=tuple)
    seal_intact: bool = True


@dataclass(frozen=True)
class ImportJob:
    import_job_id: str
    public_key_pem: str
    expires_at: dt.datetime


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s)


# --------------------------------------------------------------------------- weak keys
@functools.lru_cache(maxsize=1)
def _weak_kcvs() -> frozenset[str]:
    """The check values of every AES key whose bytes are all equal (all zero included).

    A key imported by wrapping never reaches this process, but its check value does: one
    that equals a weak key's is that key (a 40-bit match by chance is negligible). These
    keys are public constants, so computing their check values here reveals nothing."""
    out = set()
    for n in (16, 24, 32):
        for b in range(256):
            mac = CMAC(algorithms.AES(bytes([b]) * n))
            mac.update(bytes(16))
            out.add(mac.finalize()[:5].hex().upper())
    return frozenset(out)


def _refuse_weak(kcv: str) -> None:
    if kcv in _weak_kcvs():
        raise error("WEAK_KEY", "the key's bytes are all equal; nothing was stored")


# --------------------------------------------------------------------------- import jobs
def create_import_job(app: App, caller: Caller, name: str,
                      purpose: str = "S1SP_TRANSPORT") -> ImportJob:
    """An RSA-3072 pair made in the token that will hold the imported key.

    Its sealed row commits first (without a public key), then the pair is made (CKA_ID =
    the job's id), then the row gets the public key: a crash leaves at worst a job without
    a usable pair, purged at expiry, never a pair without its row (reconciliation at start
    destroys such pairs, which only a deleted row can leave)."""
    purpose = purpose or "S1SP_TRANSPORT"
    if purpose not in PURPOSES:
        raise error("WRONG_KEY_PURPOSE", f"unknown purpose {purpose}")
    purge_expired_import_jobs(app)
    now = app.clock()
    if app.records.import_jobs.outstanding(caller.identity, now) >= app.settings.import_job_quota:
        raise error("IMPORT_JOB_QUOTA", f"{caller.identity} has "
                    f"{app.settings.import_job_quota} import jobs outstanding; use or let "
                    "them expire first")
    job = ImportJobRecord("ij-" + uuid.uuid4().hex[:16], name or "", PURPOSE_PARTITION[purpose],
                          "", caller.identity, now,
                          now + dt.timedelta(hours=app.settings.import_job_ttl_hours))
    with app.store.tx() as conn:
        app.records.import_jobs.insert(conn, job)
    faults.point("import_job.after_row")
    with app.partitions.for_purpose(purpose).session() as s:
        der = hk.generate_rsa(s, job.label, key_id=job.id)
    faults.point("import_job.after_pair")
    pem = serialization.load_der_public_key(der).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    with app.store.tx() as conn:
        app.records.import_jobs.set_public_key(conn, job, pem)
    return ImportJob(job.id, pem, job.expires_at)


def purge_expired_import_jobs(app: App) -> int:
    """Destroy the pairs of import jobs no request can use any more; returns how many.

    A job's pair outlives its expiry by OPERATION_TTL: an import requested just before the
    job expired may still be approved until the operation itself expires. Rows go first,
    in one transaction, and the token objects after it commits (see _TokenEffects).
    """
    cutoff = app.clock() - OPERATION_TTL
    with app.store.tx() as conn:
        jobs = app.records.import_jobs.expired(conn, cutoff)
        app.records.import_jobs.delete(conn, [j.id for j in jobs])
    _destroy_labels([(app.partitions.tokens[j.partition], j.label) for j in jobs],
                    "an expired import job")
    return len(jobs)


def _check_length(purpose: str, length: int) -> None:
    """kw-aes256 transport keys are 256 bits; an export key may be any AES size."""
    allowed = (16, 24, 32) if purpose == "EXPORT" else (32,)
    if length not in allowed:
        raise error("KEY_UNWRAP_FAILED", f"a {purpose} key is "
                    + ("128, 192 or 256" if purpose == "EXPORT" else "256") + " bits")


def _kcv_of_unwrapped(app: App, job: ImportJobRecord, wrapped: bytes, purpose: str) -> str:
    """Unwrap into a session object just to read its check value and length."""
    def work(s) -> str:
        try:
            job_key = hk.find_private_key(s, job.label)
        except HsmKeyNotFound:
            raise error("IMPORT_JOB_NOT_FOUND", f"import job {job.id} has no key pair in "
                                                "the token") from None
        try:
            k = hk.unwrap(s, job_key, wrapped, hk.Unwrap.RSA_OAEP_SHA1, usage=hk.KCV_USAGE)
        except HsmOperationFailed:
            raise error("KEY_UNWRAP_FAILED", "wrapped_key does not unwrap under the import "
                                             "job's key") from None
        try:
            # SoftHSM2 pads odd lengths when wrapping, and CMAC refuses them: a failure of
            # either step is a key of the wrong length too.
            try:
                length = hk.key_length(k, hk.find_key(s, versions.storage(s)[1]))
                kcv = hk.check_value(k)
            except HsmOperationFailed:
                length, kcv = 0, ""
            _check_length(purpose, length)
            _refuse_weak(kcv)
            return kcv
        finally:
            hk.destroy(k)
    return app.partitions.tokens[job.partition].run(work)


# --------------------------------------------------------------------------- requests
def _check_new_key_name(app: App, conn, name: str) -> None:
    """In the transaction that then records the request: two requests for one name, on
    two replicas at once, must not both pass."""
    if not name:
        raise error("INVALID_REQUEST", "a key needs a name")
    if conn.info.get("write"):
        st.serialise(conn, "key-names")
    if app.records.keys.exists(conn, name):
        raise error("KEY_EXISTS", f"a key named {name!r} exists")
    pending = app.records.operations.pending_for(
        conn, name, ["IMPORT_TRANSPORT_KEY", "GENERATE_RECIPIENT_KEY"])
    if pending:
        raise error("KEY_EXISTS", f"operation {pending} already creates {name!r}")


def _officer_keys(caller: Caller) -> set[str]:
    """What an officer is known by (records.operations.Approval.who)."""
    return {x for x in (caller.fingerprint, "name:" + officer_name(caller.identity)) if x}


def _certificate(caller: Caller) -> str:
    """The approving certificate, as an approval records it (officers.counts)."""
    return f"{caller.issuer}:{caller.serial}" if caller.serial else ""


def _check_identifiers(**fields: str | list[str]) -> None:
    for field_name, value in fields.items():
        for v in (value if isinstance(value, list) else [value]):
            if not _IDENTIFIER.fullmatch(v or ""):
                raise error("INVALID_REQUEST", f"{field_name} must be 1-64 letters, digits, "
                            "'.', '_' or '-', starting with a letter or digit",
                            field=field_name)


def _check_label_free(app: App, purpose: str, name: str) -> None:
    """No token may hold an object of that label, nor an anchor of a key of that name (a
    row deleted from the database, a restored database, a key made outside keysvc): a name
    is one key across the partitions, or the database could choose which one is meant."""
    if name in RESERVED_LABELS or name.startswith(RESERVED_PREFIXES):
        raise error("INVALID_REQUEST", "that name is reserved for keysvc's own token objects")
    _check_identifiers(name=name)
    taken = _taken_in_tokens(app, name, "")
    if taken:
        raise error("KEY_EXISTS", taken)


def _taken_in_tokens(app: App, name: str, op_id: str) -> str:
    """Why a token already has `name` ("" if no token does), leftovers of operation
    `op_id`'s own crashed try aside."""
    for partition in PARTITIONS_WITH_KEYS:
        if partition not in app.partitions.tokens:
            continue  # another process's token: the key records and anchors below still count
        with app.partitions.tokens[partition].session() as s, s.store.shared():
            others = [o for o in s.raw.get_objects({hk.A.LABEL: name})
                      if not op_id or bytes(o[hk.A.ID] or b"") != op_id.encode()]
        if others:
            return f"the {partition} token already holds an object labelled {name!r}"
    if any(other != op_id for other in app.records.keys.anchor_ops(name)):
        return f"a key named {name!r} is anchored in the token (its record is gone)"
    return ""


def _new_operation(app: App, caller: Caller, op_id: str, kind: str, target: str,
                   partition: str, payload: dict, check_name: bool = False) -> Operation:
    """Record a sealed, anchored request; the requester's approval is its first."""
    now = app.clock()
    op = OperationRecord(op_id, partition, kind, target, "PENDING", caller.identity, (),
                         payload, "", now, now)
    op = replace(op, approvals=(app.records.operations.approval(
        op, caller.identity, caller.fingerprint, _certificate(caller)),))
    with app.records.anchors(partition).tx(app.store) as (conn, anchor):
        if check_name:
            _check_new_key_name(app, conn, target)
        app.records.operations.insert(conn, anchor, op)
    return _operation(app, op)


def import_transport_key(app: App, caller: Caller, *, name: str, purpose: str, owner_id: str,
                         owner_type: str, expected_kcv: str, wrapped_key: bytes = b"",
                         import_job_id: str = "", component: bytes = b"") -> Operation:
    if purpose not in PURPOSES:
        raise error("WRONG_KEY_PURPOSE", f"unknown purpose {purpose!r}")
    if owner_type not in OWNER_TYPES or not owner_id:
        raise error("INVALID_REQUEST", "owner_id and owner_type are required")
    _check_identifiers(name=name, owner_id=owner_id)
    expected_kcv = expected_kcv_of(expected_kcv)
    if bool(wrapped_key) == bool(component):
        raise error("INVALID_REQUEST", "give either wrapped_key with import_job_id, or component")
    op_id = "op-" + uuid.uuid4().hex[:16]
    payload: dict[str, Any] = {"name": name, "purpose": purpose, "owner_id": owner_id,
               "owner_type": owner_type, "expected_kcv": expected_kcv}
    if wrapped_key:
        job = app.records.import_jobs.get(None, import_job_id)
        if job is None:
            raise error("IMPORT_JOB_NOT_FOUND", f"no import job {import_job_id!r}")
        if job.expires_at < app.clock():
            raise error("IMPORT_JOB_EXPIRED", f"import job {import_job_id} has expired")
        if job.partition != PURPOSE_PARTITION[purpose]:
            raise error("WRONG_KEY_PURPOSE", "the import job's key is in another partition's "
                                             "token than the purpose needs")
        kcv = _kcv_of_unwrapped(app, job, wrapped_key, purpose)
        if not hmac.compare_digest(kcv, expected_kcv):
            raise error("KCV_MISMATCH", "the key's check value is not expected_kcv; "
                                        "nothing was stored")
        payload.update(import_job_id=import_job_id, wrapped_key=_b64(wrapped_key))
    else:
        if len(component) not in ((16, 24, 32) if purpose == "EXPORT" else (32,)):
            raise error("INVALID_REQUEST", "a component is as long as the key: 32 bytes for a "
                                           "transport key, 16, 24 or 32 for an export key")
        payload["components"] = [{"officer": caller.identity,
                                  "sealed": _seal_component(app, purpose, op_id,
                                                            caller.identity, component)}]
    _check_label_free(app, purpose, name)
    return _new_operation(app, caller, op_id, "IMPORT_TRANSPORT_KEY", name,
                          PURPOSE_PARTITION[purpose], payload, check_name=True)


def generate_recipient_key(app: App, caller: Caller, *, name: str, purpose: str,
                           allowed_originators: list[str]) -> Operation:
    if purpose not in ("S1SP_TRANSPORT", "DCO_TRANSPORT"):
        raise error("WRONG_KEY_PURPOSE", "a recipient key is S1SP_TRANSPORT or DCO_TRANSPORT")
    if not allowed_originators:
        raise error("INVALID_REQUEST", "name at least one allowed originator")
    _check_identifiers(name=name, allowed_originators=list(allowed_originators))
    _check_label_free(app, purpose, name)
    return _new_operation(app, caller, "op-" + uuid.uuid4().hex[:16],
                          "GENERATE_RECIPIENT_KEY", name, PURPOSE_PARTITION[purpose],
                          {"name": name, "purpose": purpose,
                           "allowed_originators": sorted(set(allowed_originators))},
                          check_name=True)


def change_key_state(app: App, caller: Caller, name: str, kind: str) -> Operation:
    """DISABLE_KEY, ENABLE_KEY or DESTROY_KEY: also dual control."""
    key = app.records.keys.get(name)
    if key is None or key.state == "DESTROYED":
        raise error("KEY_NOT_FOUND", f"no key {name!r}")
    return _new_operation(app, caller, "op-" + uuid.uuid4().hex[:16], kind, name,
                          key.partition, {"name": name})


# --------------------------------------------------------------------------- approval
@dataclass
class _TokenEffects:
    """An approval's changes to token objects, ordered around its database transaction.

    The token and the database cannot commit together. So a key is made before the commit
    (CKA_ID = the operation's id) and destroyed again if the commit does not happen (else
    the orphan would hold its label: KEY_EXISTS for ever), and what is destroyed is
    destroyed after the commit (else a failed commit would leave a key recorded ENABLED
    whose object is gone). A crash between the two is found at start (`reconcile`).
    """

    made: list[tuple[Any, str, str]] = field(default_factory=list)  # token, label, key id
    to_destroy: list[tuple[Any, str]] = field(default_factory=list)
    # Roster changes written as pending, to count once the approval has committed.
    roster: list[Any] = field(default_factory=list)  # identity.roster.Pending entries

    def undo(self, app: App) -> None:
        self._settle_roster(app)
        if self.made:
            self._undo_keys(app)

    def _settle_roster(self, app: App) -> None:
        """After the approval's transaction, whatever its outcome: a pending roster change
        counts if the operation is recorded APPROVED, and is dropped otherwise. Not part of
        the call's effects (its audit intent may be what failed); `settle` audits it."""
        hook = st.before_commit.set(None)
        try:
            for written in self.roster:
                op_id = written.op_id
                try:
                    officers.settle(app, op_id, written)
                except Exception as exc:  # the periodic sweep settles it later
                    log.error("the roster change of %s is not settled yet: %s", op_id,
                              type(exc).__name__)
        finally:
            st.before_commit.reset(hook)

    def _undo_keys(self, app: App) -> None:
        """The approval failed; but a failure reported by COMMIT itself may hide a commit
        that happened. A key whose row exists (or cannot be looked for) is kept: an orphan
        object can be cleared by hand, a destroyed key that the database lists cannot."""
        try:
            with app.store.engine.connect() as conn:
                recorded = {label for _, label, _ in self.made
                            if app.records.keys.exists(conn, label)}
        except Exception as exc:
            log.error("an approval failed and the database cannot say whether it committed "
                      "(%s); its new token objects are kept: %s", type(exc).__name__,
                      ", ".join(repr(label) for _, label, _ in self.made))
            return
        for token, label, key_id in self.made:
            if label not in recorded:
                _destroy_made(token, label, key_id, "made by an approval that did not commit")

    def after_commit(self, app: App) -> None:
        _destroy_labels(self.to_destroy, "destroyed by a committed approval")
        self._settle_roster(app)


def _destroy_labels(objects: list[tuple[Any, str]], why: str) -> None:
    for token, label in objects:
        try:
            with token.session() as s:
                hk.destroy_objects(s, label)
        except Exception as exc:  # the HSM is down: say which object is left behind
            log.error("token object %r (%s) could not be destroyed: %s", label, why,
                      type(exc).__name__)


def _destroy_made(token: Any, label: str, key_id: str, why: str) -> None:
    try:
        with token.session() as s:
            hk.destroy_with_id(s, label, key_id)
    except Exception as exc:
        log.error("token object %r (%s) could not be destroyed: %s", label, why,
                  type(exc).__name__)


def approve(app: App, caller: Caller, operation_id: str, component: bytes = b"",
            request_digest: str | None = None) -> Operation:
    """One officer's approval. `request_digest`: the request as this officer saw it
    (GetOperation); the API requires it, and a request that is not that one is refused."""
    effects = _TokenEffects()
    try:
        result, refusal, message = _approve(app, caller, operation_id, component, effects,
                                            request_digest)
    except BaseException:
        effects.undo(app)
        raise
    effects.after_commit(app)
    if refusal:  # the operation is recorded REJECTED; the caller is told why
        raise error(refusal, message, operation_id=operation_id)
    return _operation(app, result)  # after the transaction: it reads (and may audit)


def _approve(app: App, caller: Caller, operation_id: str, component: bytes,
             effects: _TokenEffects, request_digest: str | None = None
             ) -> tuple[OperationRecord, str, str]:
    partition = app.records.operations.partition_of(operation_id)
    if partition is None:
        raise error("OPERATION_NOT_FOUND", f"no operation {operation_id!r}")
    with app.records.anchors(partition).tx(app.store) as (conn, anchor):
        op = app.records.operations.get(conn, operation_id, for_update=True)
        if op is None:
            raise error("OPERATION_NOT_FOUND", f"no operation {operation_id!r}")
        now = app.clock()
        if op.state == "PENDING" and op.created_at + OPERATION_TTL < now:
            op = app.records.operations.update(conn, anchor, op, state="EXPIRED",
                                               updated_at=now)
            return op, "", ""
        if op.state != "PENDING":
            raise error("OPERATION_NOT_PENDING", f"operation {operation_id} is {op.state}")
        if _officer_keys(caller) & set().union(*(a.who for a in op.approvals)):
            raise error("SAME_OFFICER", "each approval must come from a different officer "
                                        "(another certificate key)")
        if request_digest is not None:
            shown = _shown_digest(op, _key_now(app, conn, op))
            if not (_DIGEST.fullmatch(request_digest)
                    and hmac.compare_digest(request_digest.lower().encode(), shown.encode())):
                raise error("REQUEST_CHANGED", "the operation's request, or the key it changes, "
                            f"is not what you saw (now {shown[:16]}...); nothing was approved",
                            operation_id=operation_id)
        payload = json.loads(json.dumps(op.payload))  # a copy to change
        if component and "components" not in payload:
            raise error("INVALID_REQUEST", "this operation takes no key component; "
                                           "nothing was approved")
        if "components" in payload:
            if not component:
                raise error("APPROVAL_REQUIRED", "this import needs your key component")
            first = payload["components"][0]
            if len(component) != len(_unseal(app, payload["purpose"], op.id, first["officer"],
                                             first["sealed"])):
                raise error("INVALID_REQUEST", "components must all have the same length")
            payload["components"].append({"officer": caller.identity,
                                          "sealed": _seal_component(
                                              app, payload["purpose"], op.id,
                                              caller.identity, component)})
        approvals = (*op.approvals, app.records.operations.approval(
            op, caller.identity, caller.fingerprint, _certificate(caller)))
        state, message, refusal = "PENDING", "", ""
        if sum(officers.counts(app, a) for a in approvals) >= app.settings.quorum:
            state, message, refusal = _execute(app, conn, anchor, op, payload, effects)
        op = app.records.operations.update(conn, anchor, op, approvals=approvals,
                                           payload=payload, state=state, message=message,
                                           updated_at=now)
        faults.point("approve.before_commit")
        return op, refusal, message


def _execute(app: App, conn, anchor, op: OperationRecord, p: dict, effects: _TokenEffects
             ) -> tuple[str, str, str]:
    """Carry out an approved operation; returns (state, message, refusal code or "")."""
    now = app.clock()
    if op.kind in officers.KINDS:
        return officers.execute(app, conn, op, p, effects.roster)
    if op.kind in rotation.KINDS:
        return rotation.execute(app, conn, op, p, effects)
    if op.kind in ("IMPORT_TRANSPORT_KEY", "GENERATE_RECIPIENT_KEY"):
        taken = _name_taken(app, conn, op, p["name"], p["purpose"])
        if taken:
            p.pop("components", None)  # key material is not kept for a refused request
            return "REJECTED", taken, "KEY_EXISTS"
    if op.kind == "IMPORT_TRANSPORT_KEY":
        if "components" in p:
            kcv, message, refusal = _create_from_components(app, op, p, effects)
            del p["components"]  # used once, approved or not: not kept, even sealed
        else:
            # The wrapped key stays: it is part of the request the approvals are sealed to,
            # and opens only under the import job's pair, destroyed once the key exists.
            kcv, message, refusal = _create_from_wrapped(app, conn, op, p, effects)
        if kcv is None:
            return "REJECTED", message, refusal
        app.records.keys.insert(conn, anchor, KeyRecord(
            p["name"], op.partition, p["purpose"], "AES", p["owner_id"], p["owner_type"], kcv,
            "ENABLED", now, op.id), op.id)
        return "APPROVED", "", ""
    if op.kind == "GENERATE_RECIPIENT_KEY":
        token = app.partitions.for_purpose(p["purpose"])
        with token.session() as s:
            der = hk.generate_rsa(s, p["name"], key_id=op.id)
            effects.made.append((token, p["name"], op.id))
        faults.point("approve.after_token_object")
        pem = serialization.load_der_public_key(der).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        app.records.keys.insert(conn, anchor, KeyRecord(
            p["name"], op.partition, p["purpose"], "RSA-3072", "", "", "", "ENABLED", now,
            op.id, pem, tuple(p["allowed_originators"])), op.id)
        return "APPROVED", "", ""
    key = app.records.keys.get(p["name"], conn, for_update=True)
    if key is None or key.state == "DESTROYED":
        # Destruction is final: an enable or disable approved after it changes nothing.
        return "REJECTED", f"key {p['name']!r} no longer exists", "KEY_NOT_FOUND"
    if key.partition != op.partition:
        raise app.records.refuse(conn, f"operations/{op.id}", "names a key of another "
                                                              "partition")
    if op.kind == "DESTROY_KEY":
        effects.to_destroy.append((app.partitions.tokens[key.partition], key.name))
    new_state = {"DISABLE_KEY": "DISABLED", "ENABLE_KEY": "ENABLED",
                 "DESTROY_KEY": "DESTROYED"}[op.kind]
    app.records.keys.set_state(conn, anchor, key, new_state, op.id)
    return "APPROVED", "", ""


def _name_taken(app: App, conn, op: OperationRecord, name: str, purpose: str) -> str:
    """Why the new key's name is taken ("" if it is free), checked again at approval."""
    if app.records.keys.exists(conn, name):
        return f"a key named {name!r} exists"
    taken = _taken_in_tokens(app, name, op.id)
    if taken:
        return taken
    _replace_leftovers(app.partitions.for_purpose(purpose), name, op.id)
    return ""


_DIGEST = re.compile(r"[0-9a-fA-F]{64}")


def _key_now(app: App, conn, op: OperationRecord) -> dict:
    """For a state change, the key as it is now (verified, in this transaction)."""
    view = {"key_state": "", "key_purpose": "", "key_kcv": "", "key_id": ""}
    if op.kind in ("DISABLE_KEY", "ENABLE_KEY", "DESTROY_KEY"):
        key = app.records.keys.get(op.target, conn)
        if key is not None:
            view.update(key_state=key.state, key_purpose=key.purpose, key_kcv=key.kcv,
                        key_id=key.key_id)
    return view


def _replace_leftovers(token: Any, label: str, op_id: str) -> None:
    """Before an approval makes its key: objects with this label left by an earlier try of
    the same operation (a crash before its commit; the operation is still PENDING in its
    newest anchor, so no committed key is among them) are destroyed, so that a retry
    replaces them and never adds a second object."""
    with token.session() as s:
        hk.destroy_with_id(s, label, op_id)


def _usage(purpose: str) -> dict:
    """Transport keys only unwrap what originators send; export keys only wrap."""
    return hk.EXPORT_USAGE if purpose == "EXPORT" else hk.KEK_USAGE


def _create_from_wrapped(app: App, conn, op: OperationRecord, p: dict,
                         effects: _TokenEffects) -> tuple[str | None, str, str]:
    """Make the key from the import job; returns (kcv, "", "") or (None, message, code).

    The key is checked again at approval: the import job's public key is public, so the
    wrapped bytes prove nothing by themselves. An import job serves one key: its pair is
    destroyed once the key exists.
    """
    job = app.records.import_jobs.get(conn, p["import_job_id"])
    if job is None:
        return None, "the import job was used by another import or is gone", \
            "IMPORT_JOB_NOT_FOUND"
    if job.partition != op.partition:
        raise app.records.refuse(conn, f"operations/{op.id}", "names an import job of "
                                                              "another partition")
    wrapped = _unb64(p["wrapped_key"])
    try:
        kcv = _kcv_of_unwrapped(app, job, wrapped, p["purpose"])
    except KeysvcError as exc:
        return None, exc.message, exc.code
    if not hmac.compare_digest(kcv, p["expected_kcv"]):
        return None, "the key's check value is not expected_kcv", "KCV_MISMATCH"

    def work(s) -> None:
        job_key = hk.find_private_key(s, job.label)
        hk.unwrap(s, job_key, wrapped, hk.Unwrap.RSA_OAEP_SHA1, token=True, label=p["name"],
                  usage=_usage(p["purpose"]), key_id=op.id)
    token = app.partitions.for_purpose(p["purpose"])
    token.run(work)
    effects.made.append((token, p["name"], op.id))
    faults.point("approve.after_token_object")
    effects.to_destroy.append((token, job.label))
    app.records.import_jobs.delete(conn, [job.id])
    return kcv, "", ""


def _create_from_components(app: App, op: OperationRecord, p: dict,
                            effects: _TokenEffects) -> tuple[str | None, str, str]:
    """XOR the officers' components; store the key only if it is not weak and its KCV is
    the expected one. Returns (kcv, "", "") or (None, message, code)."""
    token = app.partitions.for_purpose(p["purpose"])
    parts = [bytearray(_unseal(app, p["purpose"], op.id, c["officer"], c["sealed"]))
             for c in p["components"]]
    key = bytearray(len(parts[0]))
    try:
        for part in parts:
            for i, b in enumerate(part):
                key[i] ^= b
        if len(set(key)) == 1:  # two equal components make an all-zero key, and so on
            return None, "the key's bytes are all equal; nothing was stored", "WEAK_KEY"
        with token.session() as s:
            probe = hk.create_aes(s, bytes(key), usage=hk.KCV_USAGE)
            try:
                kcv = hk.check_value(probe)
            finally:
                hk.destroy(probe)
            if not hmac.compare_digest(kcv, p["expected_kcv"]):
                return None, "the key's check value is not expected_kcv", "KCV_MISMATCH"
            hk.create_aes(s, bytes(key), token=True, label=p["name"], usage=_usage(p["purpose"]),
                          key_id=op.id)
            effects.made.append((token, p["name"], op.id))
        faults.point("approve.after_token_object")
        return kcv, "", ""
    finally:
        for buf in (*parts, key):
            buf[:] = bytes(len(buf))


def _component_aad(op_id: str, officer: str) -> bytes:
    """A sealed component opens only for its operation and its officer: one moved to
    another operation, or credited to another officer, fails its GCM tag."""
    return b"component\x1f" + op_id.encode() + b"\x1f" + officer.encode()


def _seal_component(app: App, purpose: str, op_id: str, officer: str, component: bytes) -> str:
    """AES-GCM under the primary component-seal version; a version after the first is
    named in front (`v2:...`), so that the component opens after a rotation."""
    token = app.partitions.for_purpose(purpose)
    iv = os.urandom(12)
    with token.session() as s:
        version = versions.primary(s, COMPONENT_SEAL_KEY)
        ct = hk.gcm_encrypt(hk.find_key(s, versions.label(COMPONENT_SEAL_KEY, version)), iv,
                            component, _component_aad(op_id, officer))
    return ("" if version == 1 else f"v{version}:") + _b64(iv + ct)


_VERSIONED_COMPONENT = re.compile(r"v([1-9][0-9]{0,5}):")


def component_version(sealed: str) -> int:
    """The component-seal version a sealed component names (none: version 1)."""
    m = _VERSIONED_COMPONENT.match(sealed)
    return int(m.group(1)) if m else 1


def _unseal(app: App, purpose: str, op_id: str, officer: str, sealed: str) -> bytes:
    version = component_version(sealed)
    try:
        raw = _unb64(sealed.partition(":")[2] if version > 1 else sealed)
    except ValueError:
        raise error("DECRYPTION_FAILED", "a sealed key component is malformed") from None
    token = app.partitions.for_purpose(purpose)
    with token.session() as s:
        try:
            key = hk.find_key(s, versions.label(COMPONENT_SEAL_KEY, version))
        except hk.HsmKeyNotFound:
            raise error("KEY_VERSION_DESTROYED", f"the component is sealed under "
                                                 f"component-seal version {version}, which "
                                                 "this partition no longer has") from None
        return hk.gcm_decrypt(key, raw[:12], raw[12:], _component_aad(op_id, officer))


# --------------------------------------------------------------------------- reads
def _operation(app: App, op: OperationRecord, intact: bool = True,
               known: set[str] | None = None) -> Operation:
    state = op.state
    if intact and state == "PENDING" and op.created_at + OPERATION_TTL < app.clock():
        state = "EXPIRED"
    if not intact:
        return Operation(op.id, op.kind, op.target, state, op.requested_by, op.approved_by,
                         app.settings.quorum, op.message, op.created_at, False)
    view = _request_view(app, op, _known_parties(app) if known is None else known)
    return Operation(op.id, op.kind, op.target, state, op.requested_by, op.approved_by,
                     app.settings.quorum, op.message, op.created_at, True, view,
                     _shown_digest(op, view))


def _shown_digest(op: OperationRecord, view: dict) -> str:
    """The digest an approval names: the request's own (which each sealed approval
    statement binds), and for a state change the key as the approver saw it, so that a key
    changed meanwhile (disabled, say, while an ENABLE waits) is REQUEST_CHANGED too."""
    if op.kind not in ("DISABLE_KEY", "ENABLE_KEY", "DESTROY_KEY"):
        return op.digest
    facts = "\x1f".join((op.digest, view["key_state"], view["key_purpose"], view["key_kcv"],
                         view.get("key_id", "")))
    return hashlib.sha256(facts.encode()).hexdigest()


def _known_parties(app: App) -> set[str]:
    """Owners and allowed originators of the keys keysvc holds (verified records only)."""
    known: set[str] = set()
    for rec, ok in app.records.keys.list():
        if ok and rec.state != "DESTROYED":
            known.add(rec.owner_id)
            known.update(rec.allowed_originators)
    known.discard("")
    return known


def _request_view(app: App, op: OperationRecord, known: set[str]) -> dict:
    """Every field of the request as the approver must see it, and what to look at twice.
    Never a component or the wrapped key: those are secret or opaque."""
    p = op.request
    view = {"name": p.get("name", op.target), "purpose": p.get("purpose", ""),
            "owner_id": p.get("owner_id", ""), "owner_type": p.get("owner_type", ""),
            "expected_kcv": p.get("expected_kcv", ""),
            "allowed_originators": tuple(p.get("allowed_originators", ())),
            "import_job_id": p.get("import_job_id", ""), "algorithm": "",
            "from_components": False, "key_state": "", "key_purpose": "", "key_kcv": "",
            "officer_name": "", "fingerprint": "", "certificate_subject": "", "reason": ""}
    warnings: list[str] = []
    if op.kind in officers.KINDS:
        officers.view(app, op, view, warnings)
    elif op.kind in rotation.KINDS:
        rotation.view(app, op, view, warnings)
    elif op.kind == "IMPORT_TRANSPORT_KEY":
        view["algorithm"] = "AES"
        view["from_components"] = "wrapped_key" not in p
        if view["purpose"] == "EXPORT":
            warnings.append("an EXPORT key: ExportDeviceKeys hands out device keys wrapped "
                            "under it, so whoever holds its bits can read them")
        if view["owner_id"] and view["owner_id"] not in known:
            warnings.append(f"owner {view['owner_id']} is not the owner or an allowed "
                            "originator of any key keysvc holds")
    elif op.kind == "GENERATE_RECIPIENT_KEY":
        view["algorithm"] = "RSA-3072"
        for o in view["allowed_originators"]:
            if o not in known:
                warnings.append(f"originator {o} is not known to keysvc")
    else:
        try:
            key = app.records.keys.get(op.target)
        except KeysvcError:
            key = None
        if key is None:
            warnings.append("the key's record is missing or altered")
        else:
            view.update(key_state=key.state, key_purpose=key.purpose, key_kcv=key.kcv,
                        key_id=key.key_id)
        if op.kind == "DESTROY_KEY":
            warnings.append("destruction is final")
    view["warnings"] = tuple(warnings)
    return view


def list_operations(app: App, state: str = "") -> list[Operation]:
    known = _known_parties(app)
    ops = [_operation(app, op, ok, known) for op, ok in app.records.operations.list()]
    return [o for o in ops if not state or o.state == state]


def get_operation(app: App, operation_id: str) -> Operation:
    """One operation, verified, with the request an approver approves."""
    with app.store.engine.connect() as conn:
        op = app.records.operations.get(conn, operation_id)
    if op is None:
        raise error("OPERATION_NOT_FOUND", f"no operation {operation_id!r}")
    return _operation(app, op)


def _key_info(rec: KeyRecord, intact: bool = True) -> KeyInfo:
    return KeyInfo(rec.name, rec.purpose, rec.owner_id, rec.owner_type, rec.algorithm,
                   rec.kcv, rec.state, rec.created_at, rec.public_key_pem,
                   rec.allowed_originators, intact)


def list_keys(app: App, purpose: str = "") -> list[KeyInfo]:
    return [_key_info(rec, ok) for rec, ok in app.records.keys.list(purpose)]


def get_key(app: App, name: str) -> KeyInfo:
    rec = app.records.keys.get(name)
    if rec is None:
        raise error("KEY_NOT_FOUND", f"no key {name!r}")
    return _key_info(rec)


def register_existing_rsa_key(app: App, *, name: str, purpose: str,
                              allowed_originators: list[str], private_key) -> None:
    """Load a recipient key pair made elsewhere (the examples' published test keys)."""
    with app.store.engine.connect() as conn:
        _check_new_key_name(app, conn, name)
    _check_label_free(app, purpose, name)
    key_id = "rk-" + uuid.uuid4().hex[:16]
    token = app.partitions.for_purpose(purpose)
    with token.session() as s:
        hk.import_rsa_private(s, name, private_key, key_id)
    pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    partition = PURPOSE_PARTITION[purpose]
    with app.records.anchors(partition).tx(app.store) as (conn, anchor):
        app.records.keys.insert(conn, anchor, KeyRecord(
            name, partition, purpose, f"RSA-{private_key.key_size}", "", "", "", "ENABLED",
            app.clock(), key_id, pem, tuple(sorted(set(allowed_originators)))))


__all__ = ["Operation", "KeyInfo", "ImportJob", "create_import_job", "import_transport_key",
           "generate_recipient_key", "change_key_state", "approve", "list_operations",
           "get_operation",
           "list_keys", "get_key", "register_existing_rsa_key", "HsmKeyNotFound"]
