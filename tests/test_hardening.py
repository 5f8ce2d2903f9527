"""Rules found by review: key usage as policy, partitions independent, inputs refused clearly."""
from __future__ import annotations

import base64
import json
import os
import threading
import time

import grpc
import pytest
from pkcs11 import Attribute, Mechanism
from sqlalchemy import select, update

from keysvc import keyadmin, s1sp
from keysvc import store as st
from keysvc.api.v1 import keysvc_pb2 as pb
from keysvc.client import error_reason
from keysvc.device_certificate import TrustStore
from keysvc.errors import KeysvcError
from keysvc.hsm import HsmOperationFailed
from keysvc.hsm import keys as hk
from keysvc.partitions import STORAGE_KEY
from tests.conftest import OFFICER_1, OFFICER_2, S1SP, unique
from tests.keyloading import load_aes_key, wrap_for_job
from tests.support import encoder


def _file(app, n=2, **edit):
    factory = encoder.DeviceCertificateFactory()
    app.trust = TrustStore(anchors=(factory.ca_cert,))
    names = unique("S1SP-TK"), unique("DCO-TK")
    keks = os.urandom(32), os.urandom(32)
    load_aes_key(app, names[0], keks[0], purpose="S1SP_TRANSPORT", owner_id="SMSO-H")
    load_aes_key(app, names[1], keks[1], purpose="DCO_TRANSPORT", owner_id="SMSO-H")
    installs = encoder.random_installations(n, cert_factory=factory)
    return installs, dict(originator_id="SMSO-H", s1sp_key_name=names[0], s1sp_kek=keks[0],
                          dco_key_name=names[1], dco_kek=keks[1])


# --------------------------------------------------------------------------- key usage
def test_the_storage_key_cannot_decrypt_a_stored_wrapped_key_by_hand(app):
    """RFC 3394 can be undone with AES-ECB; a storage key that may DECRYPT would leak."""
    installs, keys = _file(app, 1)
    s1sp.process_group_information(app, S1SP, encoder.build_file(installs, **keys))
    with app.store.engine.connect() as conn:
        wrapped = conn.execute(select(st.device_keys.c.wrapped)).first().wrapped
    with app.partitions.s1sp.session() as s:
        storage = hk.find_key(s, STORAGE_KEY)
        assert not storage[Attribute.DECRYPT] and not storage[Attribute.ENCRYPT]
        with pytest.raises(Exception):
            storage.decrypt(wrapped[:16], mechanism=Mechanism.AES_ECB)


def test_a_transport_key_can_unwrap_but_never_wrap(app):
    """Its bits are the originator's: a key it wraps would be readable outside the HSM."""
    name = unique("S1SP-TK")
    load_aes_key(app, name, os.urandom(32), purpose="S1SP_TRANSPORT", owner_id="SMSO-H")
    with app.partitions.s1sp.session() as s:
        kek = hk.find_key(s, name)
        assert kek[Attribute.UNWRAP] and not kek[Attribute.WRAP]
        victim = hk.create_aes(s, os.urandom(16))
        with pytest.raises(HsmOperationFailed):
            hk.wrap(kek, victim)


def test_a_128_bit_transport_key_is_refused(app):
    job = keyadmin.create_import_job(app, OFFICER_1, "short", "S1SP_TRANSPORT")
    key = os.urandom(16)
    with pytest.raises(KeysvcError) as info:
        keyadmin.import_transport_key(
            app, OFFICER_1, name=unique("SHORT"), purpose="S1SP_TRANSPORT", owner_id="SMSO-H",
            owner_type="SMSO", expected_kcv=encoder.kcv(key),
            wrapped_key=wrap_for_job(job.public_key_pem, key), import_job_id=job.import_job_id)
    assert info.value.code == "KEY_UNWRAP_FAILED"


def test_a_wrapped_key_swapped_in_the_database_before_approval_is_record_seal_invalid(app):
    """The import job's public key is public, so anyone may wrap a key to it; the pending
    request is sealed, and a rewritten one is refused before anything is unwrapped."""
    job = keyadmin.create_import_job(app, OFFICER_1, "swap", "EXPORT")
    good, evil = os.urandom(32), os.urandom(32)
    name = unique("EXPORT")
    op = keyadmin.import_transport_key(
        app, OFFICER_1, name=name, purpose="EXPORT", owner_id="S1SP", owner_type="S1SP",
        expected_kcv=encoder.kcv(good), wrapped_key=wrap_for_job(job.public_key_pem, good),
        import_job_id=job.import_job_id)
    with app.store.tx() as conn:
        row = conn.execute(select(st.operations).where(st.operations.c.id == op.operation_id)
                           ).first()
        payload = json.loads(row.payload)
        payload["wrapped_key"] = base64.b64encode(
            wrap_for_job(job.public_key_pem, evil)).decode()
        conn.execute(update(st.operations).where(st.operations.c.id == op.operation_id)
                     .values(payload=json.dumps(payload)))
    with pytest.raises(KeysvcError) as info:
        keyadmin.approve(app, OFFICER_2, op.operation_id)
    assert info.value.code == "RECORD_SEAL_INVALID"
    assert [o.seal_intact for o in keyadmin.list_operations(app) if
            o.operation_id == op.operation_id] == [False]
    with pytest.raises(KeysvcError):
        keyadmin.get_key(app, name)


def test_a_destroyed_key_stays_destroyed_when_an_older_enable_is_approved(app):
    name = unique("S1SP-TK")
    load_aes_key(app, name, os.urandom(32), purpose="S1SP_TRANSPORT", owner_id="SMSO-H")
    disable = keyadmin.change_key_state(app, OFFICER_1, name, "DISABLE_KEY")
    keyadmin.approve(app, OFFICER_2, disable.operation_id)
    enable = keyadmin.change_key_state(app, OFFICER_1, name, "ENABLE_KEY")
    destroy = keyadmin.change_key_state(app, OFFICER_1, name, "DESTROY_KEY")
    keyadmin.approve(app, OFFICER_2, destroy.operation_id)
    with pytest.raises(KeysvcError) as info:
        keyadmin.approve(app, OFFICER_2, enable.operation_id)
    assert info.value.code == "KEY_NOT_FOUND"
    assert keyadmin.get_key(app, name).state == "DESTROYED"


# --------------------------------------------------------------------------- plaintext
def test_a_malformed_identifier_in_the_plaintext_is_never_echoed(app):
    installs, keys = _file(app, 2)
    secret_looking = os.urandom(16).hex().upper()
    installs[0].esme = secret_looking
    result = s1sp.process_group_information(app, S1SP, encoder.build_file(installs, **keys))
    rejected = result.installations[0]
    assert rejected.status == "REJECTED" and "INVALID_EUI64" in [p.code for p in rejected.problems]
    assert secret_looking not in repr(result)
    with app.store.engine.connect() as conn:
        stored = conn.execute(select(st.migration_files.c.result)).first().result
    assert secret_looking not in stored


# --------------------------------------------------------------------------- partitions
def test_re_reading_one_partitions_token_leaves_the_others_working(app):
    """After C_Finalize old session handles are renumbered: they are dropped, not closed."""
    for token in app.partitions.tokens.values():   # every token has idle sessions
        with token.session() as s:
            hk.find_key(s, STORAGE_KEY if token is not app.partitions.admin else "audit-mac")
    app.partitions.s1sp.refresh()
    for _ in range(3):
        for name, token in app.partitions.tokens.items():
            assert token.check(), name


def test_a_long_loop_lets_another_caller_reach_the_hsm(app):
    token = app.partitions.s1sp
    waiting, done = threading.Event(), threading.Event()

    def other() -> None:
        waiting.set()
        with token.session():
            done.set()
    with token.session():
        t = threading.Thread(target=other)
        t.start()
        waiting.wait(5)
        deadline = time.monotonic() + 5
        while not done.is_set() and time.monotonic() < deadline:
            token.breathe()
        assert done.is_set()  # the other caller got in while this loop still held a session
    t.join(5)


# --------------------------------------------------------------------------- gRPC inputs
@pytest.mark.parametrize("call", [
    lambda s: s.as_("auditor").audit.ListAuditEvents(
        pb.ListAuditEventsRequest(page_token="²")),
    lambda s: s.as_("auditor").audit.ListAuditEvents(
        pb.ListAuditEventsRequest(page_token="9" * 30)),
    lambda s: s.as_("s1sp").s1sp.VerifyPrepaymentKey(pb.VerifyPrepaymentKeyRequest(
        device_id="00-11-22-33-44-55-66-77", expected_kcv="ABCDEF", kcv_method=7)),
    lambda s: s.as_("s1sp").s1sp.VerifyPrepaymentKey(pb.VerifyPrepaymentKeyRequest(
        device_id="00-11-22-33-44-55-66-77", expected_kcv="ÄBC")),
    lambda s: s.as_("security-officer-1").admin.ListKeys(pb.ListKeysRequest(purpose=42)),
    lambda s: s.as_("s1sp").s1sp.ExportDeviceKeys(pb.ExportDeviceKeysRequest(
        device_id="00-11-22-33-44-55-66-77", roles=[9], export_key_name="x")),
], ids=["unicode-page-token", "huge-page-token", "unknown-kcv-method", "non-hex-kcv",
        "unknown-purpose", "unknown-role"])
def test_malformed_requests_are_invalid_argument_not_internal(server, call):
    with pytest.raises(grpc.RpcError) as info:
        call(server)
    assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), \
        error_reason(info.value)


def test_an_import_job_serves_one_key_and_its_pair_is_destroyed_after(app):
    job = keyadmin.create_import_job(app, OFFICER_1, "once", "S1SP_TRANSPORT")
    first, second = os.urandom(32), os.urandom(32)

    def request(key):
        return keyadmin.import_transport_key(
            app, OFFICER_1, name=unique("ONCE"), purpose="S1SP_TRANSPORT", owner_id="SMSO-H",
            owner_type="SMSO", expected_kcv=encoder.kcv(key),
            wrapped_key=wrap_for_job(job.public_key_pem, key), import_job_id=job.import_job_id)
    op = request(first)
    keyadmin.approve(app, OFFICER_2, op.operation_id)
    with app.partitions.s1sp.session() as s:
        assert not list(s.raw.get_objects({Attribute.LABEL: f"import-job:{job.import_job_id}"}))
    with pytest.raises(KeysvcError) as info:
        request(second)
    assert info.value.code == "IMPORT_JOB_NOT_FOUND"
