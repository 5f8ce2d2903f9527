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
import hmac
import logging
import os
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from cryptography.hazmat.primitives import serialization
from sqlalchemy import select, update

from hsm import HsmKeyNotFound, HsmOperationFailed
from hsm import keys as hk
from keysvc import store as st
from keysvc.app import App, Caller
from keysvc.errors import KeysvcError, error
from keysvc.transport import expected_kcv_of
from keysvc.partitions import COMPONENT_SEAL_KEY, PURPOSE_PARTITION, STORAGE_KEY

PURPOSES = ("S1SP_TRANSPORT", "DCO_TRANSPORT", "EXPORT")
OWNER_TYPES = ("SMSO", "REQUESTING_PARTY", "S1SP")
OPERATION_TTL = dt.timedelta(hours=24)
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


@dataclass(frozen=True)
class ImportJob:
    import_job_id: str
    public_key_pem: str
    expires_at: dt.datetime


def _with(row, **changes):
    """A database row with some fields changed, for building the returned Operation."""
    return SimpleNamespace(**{**row._mapping, **changes})


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s)


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


# --------------------------------------------------------------------------- import jobs
def create_import_job(app: App, caller: Caller, name: str,
                      purpose: str = "S1SP_TRANSPORT") -> ImportJob:
    """An RSA-3072 pair made in the token that will hold the imported key."""
    purpose = purpose or "S1SP_TRANSPORT"
    if purpose not in PURPOSES:
        raise error("WRONG_KEY_PURPOSE", f"unknown purpose {purpose}")
    purge_expired_import_jobs(app)
    job_id = "ij-" + uuid.uuid4().hex[:16]
    token = app.partitions.for_purpose(purpose)
    with token.session() as s:
        der = hk.generate_rsa(s, f"import-job:{job_id}")
    pem = serialization.load_der_public_key(der).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    now = app.clock()
    expires = now + dt.timedelta(hours=app.settings.import_job_ttl_hours)
    with app.store.tx() as conn:
        conn.execute(st.import_jobs.insert().values(
            id=job_id, name=name or job_id, partition=PURPOSE_PARTITION[purpose],
            public_key_pem=pem, created_by=caller.identity, created_at=now, expires_at=expires))
    return ImportJob(job_id, pem, expires)


def purge_expired_import_jobs(app: App) -> int:
    """Destroy the pairs of import jobs no request can use any more; returns how many.

    A job's pair outlives its expiry by OPERATION_TTL: an import requested just before the
    job expired may still be approved until the operation itself expires. Rows go first,
    in one transaction, and the token objects after it commits (see _TokenEffects).
    """
    cutoff = app.clock() - OPERATION_TTL
    with app.store.tx() as conn:
        jobs = conn.execute(select(st.import_jobs.c.id, st.import_jobs.c.partition).where(
            st.import_jobs.c.expires_at < cutoff)).all()
        if jobs:
            conn.execute(st.import_jobs.delete().where(
                st.import_jobs.c.id.in_([j.id for j in jobs])))
    _destroy_labels([(app.partitions.tokens[j.partition], f"import-job:{j.id}") for j in jobs],
                    "an expired import job")
    return len(jobs)


def _check_length(purpose: str, length: int) -> None:
    """kw-aes256 transport keys are 256 bits; an export key may be any AES size."""
    allowed = (16, 24, 32) if purpose == "EXPORT" else (32,)
    if length not in allowed:
        raise error("KEY_UNWRAP_FAILED", f"a {purpose} key is "
                    + ("128, 192 or 256" if purpose == "EXPORT" else "256") + " bits")


def _kcv_of_unwrapped(app: App, job, wrapped: bytes, purpose: str) -> str:
    """Unwrap into a session object just to read its check value and length."""
    def work(s) -> str:
        job_key = hk.find_private_key(s, f"import-job:{job.id}")
        try:
            k = hk.unwrap(s, job_key, wrapped, hk.Unwrap.RSA_OAEP_SHA1, usage=hk.KCV_USAGE)
        except HsmOperationFailed:
            raise error("KEY_UNWRAP_FAILED", "wrapped_key does not unwrap under the import "
                                             "job's key") from None
        try:
            # SoftHSM2 pads odd lengths when wrapping, and CMAC refuses them: a failure of
            # either step is a key of the wrong length too.
            try:
                length = hk.key_length(k, hk.find_key(s, STORAGE_KEY))
                kcv = hk.check_value(k)
            except HsmOperationFailed:
                length, kcv = 0, ""
            _check_length(purpose, length)
            return kcv
        finally:
            hk.destroy(k)
    return app.partitions.tokens[job.partition].run(work)


# --------------------------------------------------------------------------- requests
def _check_new_key_name(conn, name: str) -> None:
    """In the transaction that then records the request: two requests for one name, on
    two replicas at once, must not both pass."""
    if not name:
        raise error("INVALID_REQUEST", "a key needs a name")
    if conn.info.get("write"):
        st.serialise(conn, "key-names")
    if conn.execute(select(st.keys.c.name).where(st.keys.c.name == name)).first():
        raise error("KEY_EXISTS", f"a key named {name!r} exists")
    pending = conn.execute(select(st.operations.c.id).where(
        st.operations.c.target == name, st.operations.c.state == "PENDING",
        st.operations.c.kind.in_(["IMPORT_TRANSPORT_KEY", "GENERATE_RECIPIENT_KEY"]))).first()
    if pending:
        raise error("KEY_EXISTS", f"operation {pending.id} already creates {name!r}")


def _check_label_free(app: App, purpose: str, name: str) -> None:
    """The token must not hold an object of that label either (a restored database, a key
    made outside keysvc): two objects with one label would make both unusable."""
    with app.partitions.for_purpose(purpose).session() as s:
        if list(s.raw.get_objects({hk.A.LABEL: name})):
            raise error("KEY_EXISTS", f"the token already holds an object labelled {name!r}")


def _new_operation(app: App, conn, caller: Caller, kind: str, target: str,
                   payload: dict) -> Operation:
    now = app.clock()
    op_id = "op-" + uuid.uuid4().hex[:16]
    conn.execute(st.operations.insert().values(
        id=op_id, kind=kind, target=target, state="PENDING", requested_by=caller.identity,
        approvals=st.dumps([caller.identity]), payload=st.dumps(payload), message="",
        created_at=now, updated_at=now))
    return Operation(op_id, kind, target, "PENDING", caller.identity, (caller.identity,),
                     app.settings.quorum, "", now)


def import_transport_key(app: App, caller: Caller, *, name: str, purpose: str, owner_id: str,
                         owner_type: str, expected_kcv: str, wrapped_key: bytes = b"",
                         import_job_id: str = "", component: bytes = b"") -> Operation:
    if purpose not in PURPOSES:
        raise error("WRONG_KEY_PURPOSE", f"unknown purpose {purpose!r}")
    if owner_type not in OWNER_TYPES or not owner_id:
        raise error("INVALID_REQUEST", "owner_id and owner_type are required")
    expected_kcv = expected_kcv_of(expected_kcv)
    if bool(wrapped_key) == bool(component):
        raise error("INVALID_REQUEST", "give either wrapped_key with import_job_id, or component")
    payload = {"name": name, "purpose": purpose, "owner_id": owner_id,
               "owner_type": owner_type, "expected_kcv": expected_kcv}
    if wrapped_key:
        with app.store.engine.connect() as conn:
            job = conn.execute(select(st.import_jobs).where(
                st.import_jobs.c.id == import_job_id)).first()
        if job is None:
            raise error("IMPORT_JOB_NOT_FOUND", f"no import job {import_job_id!r}")
        if _aware(job.expires_at) < app.clock():
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
                                  "sealed": _seal_component(app, purpose, component)}]
    _check_label_free(app, purpose, name)
    with app.store.tx() as conn:
        _check_new_key_name(conn, name)
        return _new_operation(app, conn, caller, "IMPORT_TRANSPORT_KEY", name, payload)


def generate_recipient_key(app: App, caller: Caller, *, name: str, purpose: str,
                           allowed_originators: list[str]) -> Operation:
    if purpose not in ("S1SP_TRANSPORT", "DCO_TRANSPORT"):
        raise error("WRONG_KEY_PURPOSE", "a recipient key is S1SP_TRANSPORT or DCO_TRANSPORT")
    if not allowed_originators:
        raise error("INVALID_REQUEST", "name at least one allowed originator")
    _check_label_free(app, purpose, name)
    with app.store.tx() as conn:
        _check_new_key_name(conn, name)
        return _new_operation(app, conn, caller, "GENERATE_RECIPIENT_KEY", name,
                              {"name": name, "purpose": purpose,
                               "allowed_originators": sorted(set(allowed_originators))})


def change_key_state(app: App, caller: Caller, name: str, kind: str) -> Operation:
    """DISABLE_KEY, ENABLE_KEY or DESTROY_KEY: also dual control."""
    with app.store.tx() as conn:
        row = conn.execute(select(st.keys).where(st.keys.c.name == name)).first()
        if row is None or row.state == "DESTROYED":
            raise error("KEY_NOT_FOUND", f"no key {name!r}")
        return _new_operation(app, conn, caller, kind, name, {"name": name})


# --------------------------------------------------------------------------- approval
@dataclass
class _TokenEffects:
    """An approval's changes to token objects, ordered around its database transaction.

    The token and the database cannot commit together. So a key is made before the commit
    and destroyed again if the commit does not happen (else the orphan would hold its
    label: KEY_EXISTS for ever), and what is destroyed is destroyed after the commit
    (else a failed commit would leave a key recorded ENABLED whose object is gone).
    """

    made: list[tuple[Any, str]] = field(default_factory=list)
    to_destroy: list[tuple[Any, str]] = field(default_factory=list)

    def undo(self, app: App) -> None:
        """The approval failed; but a failure reported by COMMIT itself may hide a commit
        that happened. A key whose row exists (or cannot be looked for) is kept: an orphan
        object can be cleared by hand, a destroyed key that the database lists cannot."""
        try:
            with app.store.engine.connect() as conn:
                recorded = {r.name for r in conn.execute(select(st.keys.c.name).where(
                    st.keys.c.name.in_([label for _, label in self.made])))}
        except Exception as exc:
            log.error("an approval failed and the database cannot say whether it committed "
                      "(%s); its new token objects are kept: %s", type(exc).__name__,
                      ", ".join(repr(label) for _, label in self.made))
            return
        _destroy_labels([(t, label) for t, label in self.made if label not in recorded],
                        "made by an approval that did not commit")

    def after_commit(self) -> None:
        _destroy_labels(self.to_destroy, "destroyed by a committed approval")


def _destroy_labels(objects: list[tuple[Any, str]], why: str) -> None:
    for token, label in objects:
        try:
            with token.session() as s:
                hk.destroy_objects(s, label)
        except Exception as exc:  # the HSM is down: say which object is left behind
            log.error("token object %r (%s) could not be destroyed: %s", label, why,
                      type(exc).__name__)


def approve(app: App, caller: Caller, operation_id: str, component: bytes = b"") -> Operation:
    effects = _TokenEffects()
    try:
        result, refusal, message = _approve(app, caller, operation_id, component, effects)
    except BaseException:
        if effects.made:
            effects.undo(app)
        raise
    effects.after_commit()
    if refusal:  # the operation is recorded REJECTED; the caller is told why
        raise error(refusal, message, operation_id=operation_id)
    return result


def _approve(app: App, caller: Caller, operation_id: str, component: bytes,
             effects: _TokenEffects) -> tuple[Operation, str, str]:
    with app.store.tx() as conn:
        row = conn.execute(select(st.operations).where(st.operations.c.id == operation_id)
                           .with_for_update()).first()
        if row is None:
            raise error("OPERATION_NOT_FOUND", f"no operation {operation_id!r}")
        if row.state == "PENDING" and _aware(row.created_at) + OPERATION_TTL < app.clock():
            conn.execute(update(st.operations).where(st.operations.c.id == row.id)
                         .values(state="EXPIRED", updated_at=app.clock()))
            return _operation(app, _with(row, state="EXPIRED")), "", ""
        if row.state != "PENDING":
            raise error("OPERATION_NOT_PENDING", f"operation {operation_id} is {row.state}")
        approvals: list[str] = st.loads(row.approvals)
        if caller.identity in approvals:
            raise error("SAME_OFFICER", "each approval must come from a different officer")
        payload = st.loads(row.payload)
        if "components" in payload:
            if not component:
                raise error("APPROVAL_REQUIRED", "this import needs your key component")
            if len(component) != len(_unseal(app, payload["purpose"],
                                                payload["components"][0]["sealed"])):
                raise error("INVALID_REQUEST", "components must all have the same length")
            payload["components"].append({"officer": caller.identity,
                                          "sealed": _seal_component(app, payload["purpose"],
                                                                    component)})
        approvals.append(caller.identity)
        state, message, refusal = "PENDING", "", ""
        if len(approvals) >= app.settings.quorum:
            state, message, refusal = _execute(app, conn, row.kind, payload, effects)
        conn.execute(update(st.operations).where(st.operations.c.id == row.id).values(
            approvals=st.dumps(approvals), payload=st.dumps(payload), state=state,
            message=message, updated_at=app.clock()))
        return _operation(app, _with(row, approvals=st.dumps(approvals), state=state,
                                     message=message)), refusal, message


def _execute(app: App, conn, kind: str, p: dict, effects: _TokenEffects
             ) -> tuple[str, str, str]:
    """Carry out an approved operation; returns (state, message, refusal code or "")."""
    now = app.clock()
    if kind == "IMPORT_TRANSPORT_KEY":
        if "components" in p:
            kcv = _create_from_components(app, p, effects)
            del p["components"]  # used once, approved or not: not kept, even sealed
            message, refusal = "the key's check value is not expected_kcv", "KCV_MISMATCH"
        else:
            kcv, message, refusal = _create_from_wrapped(app, conn, p, effects)
            p.pop("wrapped_key", None)
        if kcv is None:
            return "REJECTED", message, refusal
        conn.execute(st.keys.insert().values(
            name=p["name"], partition=PURPOSE_PARTITION[p["purpose"]], purpose=p["purpose"],
            algorithm="AES", owner_id=p["owner_id"], owner_type=p["owner_type"], kcv=kcv,
            state="ENABLED", created_at=now, public_key_pem="", allowed_originators="[]"))
        return "APPROVED", "", ""
    if kind == "GENERATE_RECIPIENT_KEY":
        token = app.partitions.for_purpose(p["purpose"])
        with token.session() as s:
            der = hk.generate_rsa(s, p["name"])
            effects.made.append((token, p["name"]))
        pem = serialization.load_der_public_key(der).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        conn.execute(st.keys.insert().values(
            name=p["name"], partition=PURPOSE_PARTITION[p["purpose"]], purpose=p["purpose"],
            algorithm="RSA-3072", owner_id="", owner_type="", kcv="", state="ENABLED",
            created_at=now, public_key_pem=pem,
            allowed_originators=st.dumps(p["allowed_originators"])))
        return "APPROVED", "", ""
    key = conn.execute(select(st.keys).where(st.keys.c.name == p["name"])).first()
    if key is None or key.state == "DESTROYED":
        # Destruction is final: an enable or disable approved after it changes nothing.
        return "REJECTED", f"key {p['name']!r} no longer exists", "KEY_NOT_FOUND"
    if kind == "DESTROY_KEY":
        effects.to_destroy.append((app.partitions.tokens[key.partition], key.name))
    new_state = {"DISABLE_KEY": "DISABLED", "ENABLE_KEY": "ENABLED", "DESTROY_KEY": "DESTROYED"}[kind]
    conn.execute(update(st.keys).where(st.keys.c.name == key.name).values(state=new_state))
    return "APPROVED", "", ""


def _usage(purpose: str) -> dict:
    """Transport keys only unwrap what originators send; export keys only wrap."""
    return hk.EXPORT_USAGE if purpose == "EXPORT" else hk.KEK_USAGE


def _create_from_wrapped(app: App, conn, p: dict, effects: _TokenEffects
                         ) -> tuple[str | None, str, str]:
    """Make the key from the import job; returns (kcv, "", "") or (None, message, code).

    The key is checked again at approval: the pending row sat in the database, and the
    import job's public key is public, so the wrapped bytes there prove nothing by
    themselves. An import job serves one key: its pair is destroyed once the key exists.
    """
    job = conn.execute(select(st.import_jobs).where(
        st.import_jobs.c.id == p["import_job_id"])).first()
    if job is None:
        return None, "the import job was used by another import or is gone", \
            "IMPORT_JOB_NOT_FOUND"
    wrapped = _unb64(p["wrapped_key"])
    try:
        kcv = _kcv_of_unwrapped(app, job, wrapped, p["purpose"])
    except KeysvcError as exc:
        return None, exc.message, exc.code
    if not hmac.compare_digest(kcv, p["expected_kcv"]):
        return None, "the key's check value is not expected_kcv", "KCV_MISMATCH"

    def work(s) -> None:
        job_key = hk.find_private_key(s, f"import-job:{p['import_job_id']}")
        hk.unwrap(s, job_key, wrapped, hk.Unwrap.RSA_OAEP_SHA1,
                  token=True, label=p["name"], usage=_usage(p["purpose"]))
    token = app.partitions.for_purpose(p["purpose"])
    token.run(work)
    effects.made.append((token, p["name"]))
    effects.to_destroy.append((token, f"import-job:{job.id}"))
    conn.execute(st.import_jobs.delete().where(st.import_jobs.c.id == job.id))
    return kcv, "", ""


def _create_from_components(app: App, p: dict, effects: _TokenEffects) -> str | None:
    """XOR the officers' components; store the key only if its KCV is the expected one."""
    token = app.partitions.for_purpose(p["purpose"])
    parts = [bytearray(_unseal(app, p["purpose"], c["sealed"])) for c in p["components"]]
    key = bytearray(len(parts[0]))
    try:
        for part in parts:
            for i, b in enumerate(part):
                key[i] ^= b
        with token.session() as s:
            probe = hk.create_aes(s, bytes(key), usage=hk.KCV_USAGE)
            try:
                kcv = hk.check_value(probe)
            finally:
                hk.destroy(probe)
            if not hmac.compare_digest(kcv, p["expected_kcv"]):
                return None
            hk.create_aes(s, bytes(key), token=True, label=p["name"], usage=_usage(p["purpose"]))
            effects.made.append((token, p["name"]))
        return kcv
    finally:
        for buf in (*parts, key):
            buf[:] = bytes(len(buf))


def _seal_component(app: App, purpose: str, component: bytes) -> str:
    token = app.partitions.for_purpose(purpose)
    iv = os.urandom(12)
    with token.session() as s:
        ct = hk.gcm_encrypt(hk.find_key(s, COMPONENT_SEAL_KEY), iv, component, b"component")
    return _b64(iv + ct)


def _unseal(app: App, purpose: str, sealed: str) -> bytes:
    raw = _unb64(sealed)
    token = app.partitions.for_purpose(purpose)
    with token.session() as s:
        return hk.gcm_decrypt(hk.find_key(s, COMPONENT_SEAL_KEY), raw[:12], raw[12:],
                              b"component")


# --------------------------------------------------------------------------- reads
def _operation(app: App, row) -> Operation:
    state = row.state
    if state == "PENDING" and _aware(row.created_at) + OPERATION_TTL < app.clock():
        state = "EXPIRED"
    return Operation(row.id, row.kind, row.target, state, row.requested_by,
                     tuple(st.loads(row.approvals)), app.settings.quorum, row.message,
                     _aware(row.created_at))


def list_operations(app: App, state: str = "") -> list[Operation]:
    with app.store.engine.connect() as conn:
        rows = conn.execute(select(st.operations).order_by(st.operations.c.created_at)).all()
    ops = [_operation(app, r) for r in rows]
    return [o for o in ops if not state or o.state == state]


def _key_info(row) -> KeyInfo:
    return KeyInfo(row.name, row.purpose, row.owner_id, row.owner_type, row.algorithm,
                   row.kcv, row.state, _aware(row.created_at), row.public_key_pem,
                   tuple(st.loads(row.allowed_originators)))


def list_keys(app: App, purpose: str = "") -> list[KeyInfo]:
    q = select(st.keys).order_by(st.keys.c.name)
    if purpose:
        q = q.where(st.keys.c.purpose == purpose)
    with app.store.engine.connect() as conn:
        return [_key_info(r) for r in conn.execute(q).all()]


def get_key(app: App, name: str) -> KeyInfo:
    with app.store.engine.connect() as conn:
        row = conn.execute(select(st.keys).where(st.keys.c.name == name)).first()
    if row is None:
        raise error("KEY_NOT_FOUND", f"no key {name!r}")
    return _key_info(row)


def register_existing_rsa_key(app: App, *, name: str, purpose: str,
                              allowed_originators: list[str], private_key) -> None:
    """Load a recipient key pair made elsewhere (the examples' published test keys)."""
    with app.store.engine.connect() as conn:
        _check_new_key_name(conn, name)
    _check_label_free(app, purpose, name)
    token = app.partitions.for_purpose(purpose)
    with token.session() as s:
        hk.import_rsa_private(s, name, private_key)
    pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    with app.store.tx() as conn:
        conn.execute(st.keys.insert().values(
            name=name, partition=PURPOSE_PARTITION[purpose], purpose=purpose,
            algorithm=f"RSA-{private_key.key_size}", owner_id="", owner_type="", kcv="",
            state="ENABLED", created_at=app.clock(), public_key_pem=pem,
            allowed_originators=st.dumps(sorted(set(allowed_originators)))))


__all__ = ["Operation", "KeyInfo", "ImportJob", "create_import_job", "import_transport_key",
           "generate_recipient_key", "change_key_state", "approve", "list_operations",
           "list_keys", "get_key", "register_existing_rsa_key", "HsmKeyNotFound"]
