"""The approver sees and signs the request (issue 13, first part): GetOperation and
ListOperations show every field of the request and its digest; ApproveOperation names the
digest the approver saw, and a request that is not that one is refused (REQUEST_CHANGED);
`keysvc admin approve` prints the request and asks first."""
from __future__ import annotations

import os
import subprocess

import grpc
import pytest

from keysvc import keyadmin
from keysvc.api.v1 import keysvc_pb2 as pb
from keysvc.client import error_reason
from keysvc.errors import KeysvcError
from tests.conftest import OFFICER_1, OFFICER_2, unique
from tests.keyloading import load_aes_key
from tests.serverproc import ROOT, server_env
from tests.support.encoder import kcv


def _import(admin, name: str, purpose=pb.S1SP_TRANSPORT, owner_id="SMSO-LG-01"):
    key, c1 = os.urandom(32), os.urandom(32)
    op = admin.ImportTransportKey(pb.ImportTransportKeyRequest(
        name=name, purpose=purpose, owner_id=owner_id, owner_type=pb.SMSO,
        expected_kcv=kcv(key), component=c1))
    return op, bytes(a ^ b for a, b in zip(key, c1)), key


def test_get_operation_shows_every_field_of_the_request_and_its_digest(server):
    admin = server.as_("security-officer-1").admin
    name = unique("S1SP-TK")
    op, _, key = _import(admin, name)
    got = admin.GetOperation(pb.GetOperationRequest(operation_id=op.operation_id))
    r = got.request
    assert (r.name, r.purpose, r.algorithm, r.owner_id, r.owner_type, r.expected_kcv,
            r.from_components) == (name, pb.S1SP_TRANSPORT, "AES", "SMSO-LG-01", pb.SMSO,
                                   kcv(key), True)
    assert len(got.request_digest) == 64 and got.request_digest == op.request_digest
    listed = {o.operation_id: o for o in admin.ListOperations(
        pb.ListOperationsRequest()).operations}
    assert listed[op.operation_id].request == r
    assert listed[op.operation_id].request_digest == got.request_digest


def test_an_approval_of_another_digest_is_request_changed_and_approves_nothing(server):
    admin = server.as_("security-officer-1").admin
    op, c2, _ = _import(admin, unique("S1SP-TK"))
    o2 = server.as_("security-officer-2").admin
    with pytest.raises(grpc.RpcError) as info:
        o2.ApproveOperation(pb.ApproveOperationRequest(
            operation_id=op.operation_id, component=c2, request_digest="0" * 64))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(info.value) == "REQUEST_CHANGED"
    with pytest.raises(grpc.RpcError) as info:
        o2.ApproveOperation(pb.ApproveOperationRequest(operation_id=op.operation_id,
                                                       component=c2))
    assert error_reason(info.value) == "INVALID_REQUEST"
    got = admin.GetOperation(pb.GetOperationRequest(operation_id=op.operation_id))
    assert (got.state, list(got.approved_by)) == (pb.Operation.PENDING,
                                                  ["security-officer-1"])


def test_an_export_import_and_an_unknown_owner_are_flagged(server):
    admin = server.as_("security-officer-1").admin
    op, _, _ = _import(admin, unique("S1SP-TK-LOOKALIKE"), purpose=pb.EXPORT,
                       owner_id=unique("STRANGER"))
    warnings = " ".join(admin.GetOperation(pb.GetOperationRequest(
        operation_id=op.operation_id)).request.warnings)
    assert "EXPORT" in warnings and "is not the owner or an allowed originator" in warnings


def test_a_recipient_key_for_an_unknown_originator_is_flagged(server):
    admin = server.as_("security-officer-1").admin
    op = admin.GenerateRecipientKey(pb.GenerateRecipientKeyRequest(
        name=unique("S1SP-RK"), purpose=pb.S1SP_TRANSPORT, allowed_originators=["ATTACKER-RP"]))
    r = admin.GetOperation(pb.GetOperationRequest(operation_id=op.operation_id)).request
    assert list(r.allowed_originators) == ["ATTACKER-RP"]
    assert any("ATTACKER-RP" in w for w in r.warnings)


def test_a_state_change_shows_the_key_as_it_is_now(app):
    name, key = unique("S1SP-TK"), os.urandom(32)
    load_aes_key(app, name, key, purpose="S1SP_TRANSPORT", owner_id="SMSO-LG-01")
    op = keyadmin.change_key_state(app, OFFICER_1, name, "DESTROY_KEY")
    r = keyadmin.get_operation(app, op.operation_id).request
    assert (r["key_state"], r["key_purpose"], r["key_kcv"]) == ("ENABLED", "S1SP_TRANSPORT",
                                                               kcv(key))
    assert "destruction is final" in r["warnings"]


def test_an_approval_in_process_of_another_digest_is_request_changed(app):
    name, key = unique("S1SP-TK"), os.urandom(32)
    load_aes_key(app, name, key, purpose="S1SP_TRANSPORT", owner_id="SMSO-LG-01")
    op = keyadmin.change_key_state(app, OFFICER_1, name, "DISABLE_KEY")
    with pytest.raises(KeysvcError) as info:
        keyadmin.approve(app, OFFICER_2, op.operation_id, request_digest="f" * 64)
    assert info.value.code == "REQUEST_CHANGED"
    assert keyadmin.approve(app, OFFICER_2, op.operation_id,
                            request_digest=op.request_digest).state == "APPROVED"


def test_the_cli_shows_the_request_and_approves_nothing_unless_told_yes(server):
    admin = server.as_("security-officer-1").admin
    op, _, _ = _import(admin, unique("S1SP-TK"))
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "keysvc"), "admin", "approve",
                        op.operation_id, "--as", "security-officer-2", "--component-file",
                        "/dev/null", "--state-dir", str(server.state_dir), "--server",
                        server.target], env=server_env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=60, input="n\n")
    assert r.returncode == 1, r.stdout + r.stderr
    assert op.request_digest in r.stdout and "SMSO-LG-01" in r.stdout
    assert "not approved" in r.stdout
    got = admin.GetOperation(pb.GetOperationRequest(operation_id=op.operation_id))
    assert got.state == pb.Operation.PENDING


@pytest.mark.parametrize("field,value", [
    ("name", "S1SP-TK-EA-0101\n│ purpose │ S1SP_TRANSPORT"),
    ("owner_id", "SMSO-LG-01\x1b[1A\x1b[2K\x1b[8m"),
    ("name", "[conceal]EVIL[/conceal]"),
    ("name", "S1SP-TK-\u202eA0-AE"),
    ("name", "x" * 65)])
def test_names_and_owners_an_approver_reads_are_plain_identifiers(app, field, value):
    args = {"name": unique("S1SP-TK"), "owner_id": "SMSO-LG-01", field: value}
    with pytest.raises(KeysvcError) as info:
        keyadmin.import_transport_key(app, OFFICER_1, purpose="S1SP_TRANSPORT",
                                      owner_type="SMSO", expected_kcv=kcv(os.urandom(32)),
                                      component=os.urandom(32), **args)
    assert info.value.code == "INVALID_REQUEST"


def test_the_cli_shows_every_value_as_plain_escaped_text():
    from keysvc.cli import shown
    assert str(shown("a\nb\x1b[8m[conceal]c[/conceal]\u202e")) == \
        "a\\nb\\x1b[8m[conceal]c[/conceal]\\u202e"


def test_a_key_changed_while_its_state_change_waits_is_request_changed(app):
    """Officer 2 saw 'key now ENABLED' for an ENABLE; the key was disabled meanwhile: the
    approval of what was seen no longer matches."""
    name, key = unique("S1SP-TK"), os.urandom(32)
    load_aes_key(app, name, key, purpose="S1SP_TRANSPORT", owner_id="SMSO-LG-01")
    enable = keyadmin.change_key_state(app, OFFICER_1, name, "ENABLE_KEY")
    seen = keyadmin.get_operation(app, enable.operation_id).request_digest
    disable = keyadmin.change_key_state(app, OFFICER_1, name, "DISABLE_KEY")
    keyadmin.approve(app, OFFICER_2, disable.operation_id,
                     request_digest=keyadmin.get_operation(app, disable.operation_id)
                     .request_digest)
    with pytest.raises(KeysvcError) as info:
        keyadmin.approve(app, OFFICER_2, enable.operation_id, request_digest=seen)
    assert info.value.code == "REQUEST_CHANGED"
    assert keyadmin.get_key(app, name).state == "DISABLED"


def test_a_digest_that_is_not_hex_is_refused_never_internal(server, app):
    admin = server.as_("security-officer-1").admin
    op, c2, _ = _import(admin, unique("S1SP-TK"))
    with pytest.raises(grpc.RpcError) as info:
        server.as_("security-officer-2").admin.ApproveOperation(pb.ApproveOperationRequest(
            operation_id=op.operation_id, component=c2, request_digest="é" * 64))
    assert error_reason(info.value) == "INVALID_REQUEST"
    name = unique("S1SP-TK")
    load_aes_key(app, name, os.urandom(32), purpose="S1SP_TRANSPORT", owner_id="SMSO-LG-01")
    dis = keyadmin.change_key_state(app, OFFICER_1, name, "DISABLE_KEY")
    with pytest.raises(KeysvcError) as info:
        keyadmin.approve(app, OFFICER_2, dis.operation_id, request_digest="é" * 64)
    assert info.value.code == "REQUEST_CHANGED"
