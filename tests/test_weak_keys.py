"""Weak and malformed keys are refused (issue 13): a key whose bytes are all equal, whether
made from components or wrapped to an import job, is WEAK_KEY; a component sent where the
operation takes none is INVALID_REQUEST, and nothing is approved."""
from __future__ import annotations

import os

import pytest

from keysvc import keyadmin
from keysvc.errors import KeysvcError
from tests.conftest import OFFICER_1, OFFICER_2, unique
from tests.keyloading import wrap_for_job
from tests.support.encoder import kcv


def _refused(code: str, fn, *args, **kwargs) -> None:
    with pytest.raises(KeysvcError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value.message


def test_two_equal_components_are_weak_key_and_make_no_key(app):
    c = os.urandom(32)
    name = unique("S1SP-TK")
    op = keyadmin.import_transport_key(app, OFFICER_1, name=name, purpose="S1SP_TRANSPORT",
                                       owner_id="SMSO-LG-01", owner_type="SMSO",
                                       expected_kcv=kcv(bytes(32)), component=c)
    _refused("WEAK_KEY", keyadmin.approve, app, OFFICER_2, op.operation_id, component=c)
    assert [o.state for o in keyadmin.list_operations(app)
            if o.operation_id == op.operation_id] == ["REJECTED"]
    _refused("KEY_NOT_FOUND", keyadmin.get_key, app, name)


@pytest.mark.parametrize("byte", [0x00, 0x5A, 0xFF])
def test_a_wrapped_key_with_all_bytes_equal_is_weak_key(app, byte):
    weak = bytes([byte]) * 32
    job = keyadmin.create_import_job(app, OFFICER_1, "weak", "S1SP_TRANSPORT")
    _refused("WEAK_KEY", keyadmin.import_transport_key, app, OFFICER_1,
             name=unique("S1SP-TK"), purpose="S1SP_TRANSPORT", owner_id="SMSO-LG-01",
             owner_type="SMSO", expected_kcv=kcv(weak),
             wrapped_key=wrap_for_job(job.public_key_pem, weak),
             import_job_id=job.import_job_id)


def test_a_component_sent_with_an_approval_that_takes_none_is_invalid_request(app):
    key = os.urandom(32)
    job = keyadmin.create_import_job(app, OFFICER_1, "job", "S1SP_TRANSPORT")
    op = keyadmin.import_transport_key(
        app, OFFICER_1, name=unique("S1SP-TK"), purpose="S1SP_TRANSPORT",
        owner_id="SMSO-LG-01", owner_type="SMSO", expected_kcv=kcv(key),
        wrapped_key=wrap_for_job(job.public_key_pem, key), import_job_id=job.import_job_id)
    _refused("INVALID_REQUEST", keyadmin.approve, app, OFFICER_2, op.operation_id,
             component=os.urandom(32))
    assert [o.state for o in keyadmin.list_operations(app)
            if o.operation_id == op.operation_id] == ["PENDING"]
    assert keyadmin.approve(app, OFFICER_2, op.operation_id).state == "APPROVED"


def test_an_officer_past_the_import_job_quota_is_resource_exhausted(app):
    from dataclasses import replace

    import grpc

    from tests.conftest import OFFICER_3
    app.settings = replace(app.settings, import_job_quota=2)
    for _ in range(2):
        keyadmin.create_import_job(app, OFFICER_3, "job", "DCO_TRANSPORT")
    with pytest.raises(KeysvcError) as info:
        keyadmin.create_import_job(app, OFFICER_3, "job", "DCO_TRANSPORT")
    assert (info.value.code, info.value.status) == ("IMPORT_JOB_QUOTA",
                                                    grpc.StatusCode.RESOURCE_EXHAUSTED)
    keyadmin.create_import_job(app, OFFICER_2, "job", "DCO_TRANSPORT")  # another officer
