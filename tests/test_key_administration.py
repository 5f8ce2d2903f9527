"""Key ceremonies under dual control, in process, on the real SoftHSM2 tokens (api.md,
KeyAdministrationService). Files are made by the independent encoder and read by the real
S1SP path, so "usable" means a file encrypted under the key is accepted."""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from pkcs11 import Attribute
from sqlalchemy import select

from keysvc import keyadmin, s1sp
from keysvc import store as st
from keysvc.device_certificate import TrustStore
from keysvc.errors import KeysvcError
from keysvc.hsm import keys as hk
from tests.conftest import OFFICER_1, OFFICER_2, OFFICER_3, S1SP, unique
from tests.keyloading import load_aes_key, wrap_for_job
from tests.support.encoder import DeviceCertificateFactory, build_file, kcv, random_installations

SMSO = "SMSO-LG-01"
SUPPLIER = "RP-SUPPLIER-07"


# --------------------------------------------------------------------------- helpers
@pytest.fixture()
def devices(app) -> DeviceCertificateFactory:
    """A device CA the app trusts, so that a file's installations can be ACCEPTED."""
    factory = DeviceCertificateFactory()
    app.trust = TrustStore(anchors=(factory.ca_cert,))
    return factory


def migration_file(devices, key_name: str, kek, *, group: str = "EA",
                   originator_type: str = "SMSO", originator_id: str = SMSO) -> bytes:
    """A two-installation file whose content key travels under `kek`, named `key_name`."""
    return build_file(random_installations(2, group=group, cert_factory=devices),
                      group_id=group, file_id=unique("MGEF"), originator_type=originator_type,
                      originator_id=originator_id, s1sp_key_name=key_name, s1sp_kek=kek,
                      dco_key_name="DCO-UNUSED", dco_kek=os.urandom(32))


def process(app, data: bytes):
    return s1sp.process_group_information(app, S1SP, data)


def reason(call) -> str:
    """The api.md reason code a call fails with."""
    with pytest.raises(KeysvcError) as exc:
        call()
    return exc.value.code


def request_import(app, officer, name: str, key: bytes, *, expected_kcv: str | None = None,
                   purpose: str = "S1SP_TRANSPORT") -> keyadmin.Operation:
    job = keyadmin.create_import_job(app, officer, f"job {name}", purpose)
    return keyadmin.import_transport_key(
        app, officer, name=name, purpose=purpose, owner_id=SMSO, owner_type="SMSO",
        expected_kcv=kcv(key) if expected_kcv is None else expected_kcv,
        wrapped_key=wrap_for_job(job.public_key_pem, key), import_job_id=job.import_job_id)


def request_components(app, officer, name: str, component: bytes,
                       expected_kcv: str) -> keyadmin.Operation:
    return keyadmin.import_transport_key(
        app, officer, name=name, purpose="S1SP_TRANSPORT", owner_id=SMSO, owner_type="SMSO",
        expected_kcv=expected_kcv, component=component)


def operation(app, operation_id: str) -> keyadmin.Operation:
    return next(o for o in keyadmin.list_operations(app) if o.operation_id == operation_id)


def stored_payload(app, operation_id: str) -> dict:
    with app.store.engine.connect() as conn:
        return st.loads(conn.execute(select(st.operations.c.payload).where(
            st.operations.c.id == operation_id)).scalar_one())


def token_objects(app, label: str, partition: str = "s1sp") -> list:
    """Every object with this label in the token, found afresh (no per-session cache)."""
    with app.partitions.tokens[partition].session() as s:
        return list(s.raw.get_objects({Attribute.LABEL: label}))


def token_key_is(app, name: str, value: bytes) -> bool:
    """The token's key `name` holds `value`: it unwraps what pyca wrapped under `value`
    (transport keys may only unwrap) to a key with the probe's check value."""
    probe = os.urandom(16)
    with app.partitions.s1sp.session() as s:
        try:
            obj = hk.unwrap(s, hk.find_key(s, name), aes_key_wrap(value, probe),
                            hk.Unwrap.AES_KW, usage=hk.KCV_USAGE)
        except hk.HsmOperationFailed:
            return False
        try:
            return hk.check_value(obj) == kcv(probe)
        finally:
            hk.destroy(obj)


def xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b))


# --------------------------------------------------------------------------- dual control
def test_transport_key_imported_by_one_officer_is_unusable_until_a_second_approves(app,
                                                                                    devices):
    name, key = unique("S1SP-TK"), os.urandom(32)
    op = request_import(app, OFFICER_1, name, key)
    data = migration_file(devices, name, key)

    assert op.state == "PENDING"
    assert reason(lambda: process(app, data)) == "UNKNOWN_TRANSPORT_KEY"
    assert token_objects(app, name) == []

    assert keyadmin.approve(app, OFFICER_2, op.operation_id).state == "APPROVED"
    result = process(app, data)
    assert (result.accepted_count, result.rejected_count) == (2, 0)


def test_the_requesting_officer_approving_gets_same_officer_and_never_completes_it(app):
    name = unique("S1SP-TK")
    op = request_import(app, OFFICER_1, name, os.urandom(32))

    assert reason(lambda: keyadmin.approve(app, OFFICER_1, op.operation_id)) == "SAME_OFFICER"
    assert operation(app, op.operation_id).state == "PENDING"
    assert operation(app, op.operation_id).approved_by == ("security-officer-1",)
    assert reason(lambda: keyadmin.get_key(app, name)) == "KEY_NOT_FOUND"


def test_a_quorum_of_three_needs_three_distinct_officers(app):
    app.settings = dataclasses.replace(app.settings, quorum=3)
    name = unique("S1SP-TK")
    op = request_import(app, OFFICER_1, name, os.urandom(32))

    second = keyadmin.approve(app, OFFICER_2, op.operation_id)
    assert (second.state, second.quorum) == ("PENDING", 3)
    assert reason(lambda: keyadmin.approve(app, OFFICER_2, op.operation_id)) == "SAME_OFFICER"
    assert reason(lambda: keyadmin.get_key(app, name)) == "KEY_NOT_FOUND"

    third = keyadmin.approve(app, OFFICER_3, op.operation_id)
    assert third.state == "APPROVED"
    assert third.approved_by == ("security-officer-1", "security-officer-2",
                                 "security-officer-3")
    assert keyadmin.get_key(app, name).state == "ENABLED"


# --------------------------------------------------------------------------- import job
def test_a_wrong_expected_kcv_rejects_the_import_and_stores_nothing(app):
    name, key = unique("S1SP-TK"), os.urandom(32)
    wrong = kcv(os.urandom(32))

    assert reason(lambda: request_import(app, OFFICER_1, name, key,
                                         expected_kcv=wrong)) == "KCV_MISMATCH"
    assert keyadmin.list_keys(app) == []
    assert keyadmin.list_operations(app) == []
    assert token_objects(app, name) == []


def test_a_key_imported_through_an_import_job_has_the_kcv_pyca_computes(app):
    name, key = unique("S1SP-TK"), os.urandom(32)
    op = request_import(app, OFFICER_1, name, key)
    keyadmin.approve(app, OFFICER_2, op.operation_id)

    info = keyadmin.get_key(app, name)
    assert info.kcv == kcv(key)
    assert (info.algorithm, info.purpose, info.owner_id) == ("AES", "S1SP_TRANSPORT", SMSO)
    assert token_key_is(app, name, key)


# --------------------------------------------------------------------------- components
def test_a_key_from_two_officers_components_is_their_xor(app):
    name, c1, c2 = unique("S1SP-TK"), os.urandom(32), os.urandom(32)
    op = request_components(app, OFFICER_1, name, c1, kcv(xor(c1, c2)))
    assert op.state == "PENDING"

    done = keyadmin.approve(app, OFFICER_2, op.operation_id, c2)
    assert done.state == "APPROVED"
    assert keyadmin.get_key(app, name).kcv == kcv(xor(c1, c2))
    assert token_key_is(app, name, xor(c1, c2))


def test_approving_a_components_import_without_a_component_is_approval_required(app):
    name, c1 = unique("S1SP-TK"), os.urandom(32)
    op = request_components(app, OFFICER_1, name, c1, kcv(xor(c1, os.urandom(32))))
    assert reason(lambda: keyadmin.approve(app, OFFICER_2, op.operation_id)) == \
        "APPROVAL_REQUIRED"
    assert operation(app, op.operation_id).approved_by == ("security-officer-1",)


def test_approving_an_unknown_operation_is_operation_not_found(app):
    assert reason(lambda: keyadmin.approve(app, OFFICER_2, "op-0000000000000000")) == \
        "OPERATION_NOT_FOUND"


def test_two_components_from_the_same_officer_are_refused(app):
    name, c1, c2 = unique("S1SP-TK"), os.urandom(32), os.urandom(32)
    op = request_components(app, OFFICER_1, name, c1, kcv(xor(c1, c2)))

    assert reason(lambda: keyadmin.approve(app, OFFICER_1, op.operation_id, c2)) == \
        "SAME_OFFICER"
    assert operation(app, op.operation_id).state == "PENDING"
    assert token_objects(app, name) == []


def test_components_whose_xor_has_the_wrong_kcv_end_rejected_and_store_nothing(app):
    name, c1, c2 = unique("S1SP-TK"), os.urandom(32), os.urandom(32)
    op = request_components(app, OFFICER_1, name, c1, kcv(os.urandom(32)))

    assert reason(lambda: keyadmin.approve(app, OFFICER_2, op.operation_id, c2)) == \
        "KCV_MISMATCH"
    assert operation(app, op.operation_id).state == "REJECTED"
    assert keyadmin.list_keys(app) == []
    assert token_objects(app, name) == []
    assert "components" not in stored_payload(app, op.operation_id)  # not even sealed


# --------------------------------------------------------------------------- recipient keys
def generate_recipient_key(app, name: str, originators: list[str]) -> rsa.RSAPublicKey:
    op = keyadmin.generate_recipient_key(app, OFFICER_1, name=name, purpose="S1SP_TRANSPORT",
                                         allowed_originators=originators)
    assert op.state == "PENDING"
    keyadmin.approve(app, OFFICER_2, op.operation_id)
    return serialization.load_pem_public_key(keyadmin.get_key(app, name).public_key_pem.encode())


def test_an_approved_recipient_key_has_an_rsa_3072_public_key(app):
    name = unique("S1SP-RK")
    public = generate_recipient_key(app, name, [SUPPLIER])

    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 3072
    info = keyadmin.get_key(app, name)
    assert (info.algorithm, info.allowed_originators) == ("RSA-3072", (SUPPLIER,))


def test_recipient_and_import_job_private_keys_may_only_unwrap(app):
    """C_Decrypt with them would hand the plaintext to this process; C_UnwrapKey keeps it
    in the token."""
    name = unique("S1SP-RK")
    generate_recipient_key(app, name, [SUPPLIER])
    job = keyadmin.create_import_job(app, OFFICER_1, "usage", "S1SP_TRANSPORT")
    with app.partitions.s1sp.session() as s:
        for label in (name, f"import-job:{job.import_job_id}"):
            private = hk.find_private_key(s, label)
            assert private[Attribute.UNWRAP], label
            assert not any(private[a] for a in (Attribute.DECRYPT, Attribute.SIGN,
                                                Attribute.DERIVE)), label


def test_a_file_encrypted_to_a_recipient_key_by_an_allowed_originator_is_processed(app, devices):
    name = unique("S1SP-RK")
    public = generate_recipient_key(app, name, [SUPPLIER])
    data = migration_file(devices, name, public, group="EB",
                          originator_type="RequestingParty", originator_id=SUPPLIER)

    result = process(app, data)
    assert (result.accepted_count, result.rejected_count) == (2, 0)


def test_a_file_to_a_recipient_key_from_an_originator_not_allowed_is_refused(app, devices):
    name = unique("S1SP-RK")
    public = generate_recipient_key(app, name, [SUPPLIER])
    data = migration_file(devices, name, public, group="EB",
                          originator_type="RequestingParty", originator_id="RP-SOMEONE-ELSE")

    assert reason(lambda: process(app, data)) == "ORIGINATOR_NOT_PERMITTED"


# --------------------------------------------------------------------------- key states
def change_state(app, name: str, kind: str) -> None:
    """One officer asks, the state stays as it was; a second approves."""
    before = keyadmin.get_key(app, name).state
    op = keyadmin.change_key_state(app, OFFICER_1, name, kind)
    assert op.state == "PENDING"
    assert keyadmin.get_key(app, name).state == before
    assert keyadmin.approve(app, OFFICER_2, op.operation_id).state == "APPROVED"


def test_a_disabled_key_gives_transport_key_disabled_until_enabled_again(app, devices):
    name, key = unique("S1SP-TK"), os.urandom(32)
    load_aes_key(app, name, key, purpose="S1SP_TRANSPORT", owner_id=SMSO)

    change_state(app, name, "DISABLE_KEY")
    assert keyadmin.get_key(app, name).state == "DISABLED"
    data = migration_file(devices, name, key)
    assert reason(lambda: process(app, data)) == "TRANSPORT_KEY_DISABLED"

    change_state(app, name, "ENABLE_KEY")
    assert keyadmin.get_key(app, name).state == "ENABLED"
    assert process(app, migration_file(devices, name, key)).accepted_count == 2


def test_a_destroyed_key_is_unknown_and_its_token_object_is_gone(app, devices):
    name, key = unique("S1SP-TK"), os.urandom(32)
    load_aes_key(app, name, key, purpose="S1SP_TRANSPORT", owner_id=SMSO)
    assert len(token_objects(app, name)) == 1

    change_state(app, name, "DESTROY_KEY")
    assert keyadmin.get_key(app, name).state == "DESTROYED"
    assert token_objects(app, name) == []
    data = migration_file(devices, name, key)
    assert reason(lambda: process(app, data)) == "UNKNOWN_TRANSPORT_KEY"


# --------------------------------------------------------------------------- import jobs
def import_job_exists(app, job_id: str) -> tuple[bool, bool]:
    """(the job's row exists, its pair is in the token)."""
    with app.store.engine.connect() as conn:
        row = conn.execute(select(st.import_jobs.c.id).where(st.import_jobs.c.id == job_id))
        has_row = row.first() is not None
    return has_row, bool(token_objects(app, f"import-job:{job_id}"))


def test_an_import_job_a_day_past_its_expiry_is_purged_with_its_pair(app):
    t0 = dt.datetime(2026, 11, 1, 9, tzinfo=dt.timezone.utc)
    ttl = dt.timedelta(hours=app.settings.import_job_ttl_hours)
    app.clock = lambda: t0
    old = keyadmin.create_import_job(app, OFFICER_1, "old").import_job_id

    # Expired, but an import requested just before the expiry may still be approved.
    app.clock = lambda: t0 + ttl + dt.timedelta(hours=23)
    keyadmin.create_import_job(app, OFFICER_1, "next")
    assert import_job_exists(app, old) == (True, True)

    app.clock = lambda: t0 + ttl + dt.timedelta(hours=25)
    keyadmin.create_import_job(app, OFFICER_1, "later")
    assert import_job_exists(app, old) == (False, False)


def test_an_import_requested_before_its_job_expired_can_still_be_approved(app):
    t0 = dt.datetime(2026, 11, 1, 9, tzinfo=dt.timezone.utc)
    ttl = dt.timedelta(hours=app.settings.import_job_ttl_hours)
    app.clock = lambda: t0
    job = keyadmin.create_import_job(app, OFFICER_1, "job")
    name, key = unique("S1SP-TK"), os.urandom(32)
    app.clock = lambda: t0 + ttl - dt.timedelta(hours=1)
    op = keyadmin.import_transport_key(
        app, OFFICER_1, name=name, purpose="S1SP_TRANSPORT", owner_id=SMSO, owner_type="SMSO",
        expected_kcv=kcv(key), wrapped_key=wrap_for_job(job.public_key_pem, key),
        import_job_id=job.import_job_id)

    app.clock = lambda: t0 + ttl + dt.timedelta(hours=22)
    assert keyadmin.purge_expired_import_jobs(app) == 0
    assert keyadmin.approve(app, OFFICER_2, op.operation_id).state == "APPROVED"
    assert token_key_is(app, name, key)


# --------------------------------------------------------------------------- token and database
class CommitFails(Exception):
    pass


@pytest.fixture
def failing_commit(monkeypatch):
    """Once armed, approvals fail after their token work, inside their transaction (as a
    lost database connection would): at the last point before the commit. Calling it again
    disarms it."""
    from keysvc import faults
    real = faults.point

    def fail(where: str) -> None:
        if where == "approve.before_commit":
            raise CommitFails()
        real(where)

    def toggle() -> None:
        if faults.point is fail:
            monkeypatch.undo()
        else:
            monkeypatch.setattr(faults, "point", fail)
    return toggle


def _import_by_job(app, name):
    key = os.urandom(32)
    return request_import(app, OFFICER_1, name, key), b"", lambda: token_key_is(app, name, key)


def _import_by_components(app, name):
    c1, c2 = os.urandom(32), os.urandom(32)
    op = request_components(app, OFFICER_1, name, c1, kcv(xor(c1, c2)))
    return op, c2, lambda: token_key_is(app, name, xor(c1, c2))


def _recipient_key(app, name):
    op = keyadmin.generate_recipient_key(app, OFFICER_1, name=name, purpose="S1SP_TRANSPORT",
                                         allowed_originators=[SUPPLIER])
    return op, b"", lambda: len(token_objects(app, name)) == 2  # private and public


@pytest.mark.parametrize("request_key", [_import_by_job, _import_by_components, _recipient_key],
                         ids=["import-job", "components", "recipient-key"])
def test_a_key_made_by_an_approval_that_does_not_commit_leaves_no_token_object(
        app, failing_commit, request_key):
    name = unique("S1SP-TK")
    op, component, key_is_there = request_key(app, name)

    failing_commit()
    with pytest.raises(CommitFails):
        keyadmin.approve(app, OFFICER_2, op.operation_id, component)
    failing_commit()  # the database is back
    assert token_objects(app, name) == []
    assert operation(app, op.operation_id).state == "PENDING"
    assert reason(lambda: keyadmin.get_key(app, name)) == "KEY_NOT_FOUND"

    # Nothing blocks the name: the same approval, given again, makes the key.
    assert keyadmin.approve(app, OFFICER_2, op.operation_id, component).state == "APPROVED"
    assert key_is_there()


def test_a_key_whose_commit_happened_but_was_reported_failed_is_kept(app, monkeypatch):
    """COMMIT can fail on the wire after the database did it: the key row then exists,
    and its token object must too."""
    name, key = unique("S1SP-TK"), os.urandom(32)
    op = request_import(app, OFFICER_1, name, key)
    real = keyadmin._approve

    def committed_then_lost(*args):
        real(*args)
        raise CommitFails()
    monkeypatch.setattr(keyadmin, "_approve", committed_then_lost)
    with pytest.raises(CommitFails):
        keyadmin.approve(app, OFFICER_2, op.operation_id)
    assert keyadmin.get_key(app, name).state == "ENABLED"
    assert token_key_is(app, name, key)


def test_two_requests_for_one_name_at_once_make_one_operation(any_app):
    import threading
    name = unique("S1SP-TK")
    barrier, outcome = threading.Barrier(4), []

    def ask() -> None:
        barrier.wait()
        try:
            outcome.append(keyadmin.generate_recipient_key(
                any_app, OFFICER_1, name=name, purpose="S1SP_TRANSPORT",
                allowed_originators=[SUPPLIER]).state)
        except KeysvcError as exc:
            outcome.append(exc.code)
    threads = [threading.Thread(target=ask) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(outcome) == ["KEY_EXISTS"] * 3 + ["PENDING"]


def test_a_destroy_whose_approval_does_not_commit_leaves_the_key_whole(app, failing_commit):
    name, key = unique("S1SP-TK"), os.urandom(32)
    load_aes_key(app, name, key, purpose="S1SP_TRANSPORT", owner_id=SMSO)
    op = keyadmin.change_key_state(app, OFFICER_1, name, "DESTROY_KEY")

    failing_commit()
    with pytest.raises(CommitFails):
        keyadmin.approve(app, OFFICER_2, op.operation_id)
    failing_commit()
    assert keyadmin.get_key(app, name).state == "ENABLED"
    assert token_key_is(app, name, key)


# --------------------------------------------------------------------------- outside view
def pkcs11_tool_objects(app, partition: str = "s1sp") -> dict[str, set[str]]:
    """label -> the Access flags OpenSC's pkcs11-tool prints for each secret key object."""
    s = app.settings
    out = subprocess.run(
        ["pkcs11-tool", "--module", s.pkcs11_module, "--token-label", s.token_label(partition),
         "--login", "--pin", s.pin(partition), "--list-objects"],
        env={**os.environ, "SOFTHSM2_CONF": os.environ["SOFTHSM2_CONF"]},
        capture_output=True, text=True, check=True, timeout=60).stdout
    objects: dict[str, set[str]] = {}
    for block in re.split(r"^(?=\S)", out, flags=re.M):
        if not block.startswith("Secret Key Object"):
            continue
        label = re.search(r"^\s+label:\s+(.*)$", block, re.M)
        access = re.search(r"^\s+Access:\s+(.*)$", block, re.M)
        if label and access:
            objects[label.group(1).strip()] = {a.strip() for a in access.group(1).split(",")}
    return objects


def test_pkcs11_tool_shows_an_imported_key_sensitive_and_not_extractable(app):
    name = unique("S1SP-TK")
    load_aes_key(app, name, os.urandom(32), purpose="S1SP_TRANSPORT", owner_id=SMSO)

    access = pkcs11_tool_objects(app)[name]
    assert "sensitive" in access
    assert "extractable" not in access
