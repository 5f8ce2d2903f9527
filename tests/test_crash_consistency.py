"""Crash consistency between the token and the database, with real kill -9s.

The token and the database cannot commit together. A server killed (SIGKILL, at a fault
point set by KEYSVC_FAULT) between making a token object and committing its record must,
once restarted, hold no object that no record accounts for, and an approval tried again
must make exactly one object under the key's name.
"""
from __future__ import annotations

import os
import sqlite3

import grpc
import pytest

from keysvc.api.v1 import keysvc_pb2 as pb
from keysvc.client import error_reason
from tests.serverproc import start_server
from tests.support.encoder import kcv
from tests.test_dual_control import list_token


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return tmp_path_factory.mktemp("crash")


def _killed_at(state, point: str, call) -> None:
    """Run `call` on a server that dies at `point`; it must have died there."""
    srv = start_server(state, env={"KEYSVC_FAULT": point})
    try:
        with pytest.raises(grpc.RpcError) as info:
            call(srv)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        srv.proc.wait(timeout=30)
        assert srv.proc.returncode == -9, f"the server did not die at {point}"
    finally:
        srv.stop()


def _objects(state, label: str) -> list[str]:
    return [t for t, lab in list_token(state, "s1sp") if lab.strip("'") == label]


def _db(state) -> sqlite3.Connection:
    return sqlite3.connect(state / "keysvc.db")


def _request_import(state) -> tuple[pb.Operation, str, bytes, bytes]:
    key, c1 = os.urandom(32), os.urandom(32)
    name = f"S1SP-TK-CRASH-{os.urandom(4).hex()}".upper()
    srv = start_server(state)
    op = srv.as_("security-officer-1").admin.ImportTransportKey(pb.ImportTransportKeyRequest(
        name=name, purpose=pb.S1SP_TRANSPORT, owner_id="SMSO-LG-01", owner_type=pb.SMSO,
        expected_kcv=kcv(key), component=c1))
    srv.stop()
    return op, name, key, bytes(a ^ b for a, b in zip(key, c1))


def _approval(op, c2) -> pb.ApproveOperationRequest:
    return pb.ApproveOperationRequest(operation_id=op.operation_id, component=c2,
                                      request_digest=op.request_digest)


def test_a_key_made_by_an_approval_killed_before_anchoring_is_destroyed_and_the_retry_makes_one(
        state):
    op, name, key, c2 = _request_import(state)
    _killed_at(state, "approve.after_token_object",
               lambda s: s.as_("security-officer-2").admin.ApproveOperation(_approval(op, c2)))
    assert _objects(state, name) == ["Secret Key"]  # made, never recorded
    srv = start_server(state)
    try:
        assert _objects(state, name) == []  # its operation is verifiably still PENDING
        admin = srv.as_("security-officer-1").admin
        with pytest.raises(grpc.RpcError) as info:
            admin.GetKey(pb.GetKeyRequest(name=name))
        assert error_reason(info.value) == "KEY_NOT_FOUND"
        done = srv.as_("security-officer-2").admin.ApproveOperation(_approval(op, c2))
        assert done.state == pb.Operation.APPROVED
        k = admin.GetKey(pb.GetKeyRequest(name=name))
        assert (k.state, k.kcv) == (pb.KeyInfo.ENABLED, kcv(key))
        assert _objects(state, name) == ["Secret Key"]
    finally:
        srv.stop()


def test_an_approval_killed_after_anchoring_is_completed_at_start_from_the_token(state):
    """Its new records are anchored in the token, so the token says the approval happened:
    start-up rolls the database forward to them (whether the commit was cut off before or
    after it happened, which the database alone could not be trusted to tell)."""
    op, name, key, c2 = _request_import(state)
    op_id = op.operation_id
    _killed_at(state, "approve.before_commit",
               lambda s: s.as_("security-officer-2").admin.ApproveOperation(_approval(op, c2)))
    srv = start_server(state)
    try:
        admin = srv.as_("security-officer-1").admin
        k = admin.GetKey(pb.GetKeyRequest(name=name))
        assert (k.state, k.kcv, k.seal_intact) == (pb.KeyInfo.ENABLED, kcv(key), True)
        ops = {o.operation_id: o for o in admin.ListOperations(
            pb.ListOperationsRequest()).operations}
        assert ops[op_id].state == pb.Operation.APPROVED and ops[op_id].seal_intact
        assert _objects(state, name) == ["Secret Key"]
        with pytest.raises(grpc.RpcError) as info:
            srv.as_("security-officer-2").admin.ApproveOperation(_approval(op, c2))
        assert error_reason(info.value) == "OPERATION_NOT_PENDING"
    finally:
        srv.stop()


@pytest.mark.parametrize("point", ["import_job.after_row", "import_job.after_pair"])
def test_a_create_import_job_killed_midway_leaves_no_orphan_pair(state, point):
    _killed_at(state, point, lambda s: s.as_("security-officer-1").admin.CreateImportJob(
        pb.CreateImportJobRequest(name="crash", purpose=pb.S1SP_TRANSPORT)))
    srv = start_server(state)
    srv.stop()
    with _db(state) as db:
        jobs = {r[0] for r in db.execute("SELECT id FROM import_jobs")}
    pairs = {lab.strip("'").split(":", 1)[1] for _, lab in list_token(state, "s1sp")
             if lab.strip("'").startswith("import-job:")}
    assert pairs <= jobs


def test_an_import_job_pair_whose_row_is_gone_is_destroyed_at_start(state):
    srv = start_server(state)
    try:
        job = srv.as_("security-officer-1").admin.CreateImportJob(
            pb.CreateImportJobRequest(name="gone", purpose=pb.S1SP_TRANSPORT))
    finally:
        srv.stop()
    label = f"import-job:{job.import_job_id}"
    assert sorted(_objects(state, label)) == ["Private Key", "Public Key"]
    with _db(state) as db:
        db.execute("DELETE FROM import_jobs WHERE id=?", (job.import_job_id,))
    start_server(state).stop()
    assert _objects(state, label) == []


def test_an_approval_retried_on_another_replica_replaces_the_leftover_of_its_crashed_try(app):
    """Without a restart (another replica retries): the object the crashed try left, with
    this operation's id, is replaced; the token never holds two objects of one name."""
    from keysvc import keyadmin
    from keysvc.hsm import keys as hk
    from tests.conftest import OFFICER_1, OFFICER_2, unique
    key, c1 = os.urandom(32), os.urandom(32)
    name = unique("S1SP-TK")
    op = keyadmin.import_transport_key(app, OFFICER_1, name=name, purpose="S1SP_TRANSPORT",
                                       owner_id="SMSO-LG-01", owner_type="SMSO",
                                       expected_kcv=kcv(key), component=c1)
    with app.partitions.s1sp.session() as s:  # what the crashed try left behind
        hk.create_aes(s, os.urandom(32), token=True, label=name, usage=hk.KEK_USAGE,
                      key_id=op.operation_id)
    keyadmin.approve(app, OFFICER_2, op.operation_id,
                     component=bytes(a ^ b for a, b in zip(key, c1)))
    with app.partitions.s1sp.session() as s:
        assert len(list(s.raw.get_objects({hk.A.LABEL: name}))) == 1
    assert keyadmin.get_key(app, name).kcv == kcv(key)


def test_an_approval_refuses_a_name_another_object_holds(app):
    from keysvc import keyadmin
    from keysvc.errors import KeysvcError
    from keysvc.hsm import keys as hk
    from tests.conftest import OFFICER_1, OFFICER_2, unique
    key, c1 = os.urandom(32), os.urandom(32)
    name = unique("S1SP-TK")
    op = keyadmin.import_transport_key(app, OFFICER_1, name=name, purpose="S1SP_TRANSPORT",
                                       owner_id="SMSO-LG-01", owner_type="SMSO",
                                       expected_kcv=kcv(key), component=c1)
    with app.partitions.s1sp.session() as s:  # made outside keysvc after the request
        hk.create_aes(s, os.urandom(32), token=True, label=name, usage=hk.KEK_USAGE,
                      key_id="someone-else")
    with pytest.raises(KeysvcError) as info:
        keyadmin.approve(app, OFFICER_2, op.operation_id,
                         component=bytes(a ^ b for a, b in zip(key, c1)))
    assert info.value.code == "KEY_EXISTS"
    with app.partitions.s1sp.session() as s:
        assert len(list(s.raw.get_objects({hk.A.LABEL: name}))) == 1
