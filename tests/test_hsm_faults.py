"""HSM faults: a token that stops answering fails calls fast, and heals without a restart."""
from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keysvc.api.v1 import keysvc_pb2 as pb
from keysvc.client import error_reason
from tests.serverproc import start_server
from tests.support.waiting import until as _wait_for


def _health(server) -> int:
    stub = health_pb2_grpc.HealthStub(server.as_("s1sp").channel)
    return stub.Check(health_pb2.HealthCheckRequest(service="")).status


@pytest.fixture()
def fault_server(tmp_path):
    srv = start_server(tmp_path / "state")
    yield srv
    srv.stop()


def test_unusable_token_fails_fast_and_closed_and_recovers_without_restart(fault_server):
    """Its audit event cannot be kept either (the admin token is gone too): the call says
    only AUDIT_UNAVAILABLE, and the log line names the HSM's failure."""
    token_dirs = [d for d in (fault_server.state_dir / "hsm" / "tokens").iterdir()]
    assert _health(fault_server) == health_pb2.HealthCheckResponse.SERVING
    moved = [d.rename(d.with_name(d.name + ".away")) for d in token_dirs]
    try:
        # the first call may find out the hard way; the ones after it fail fast
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                fault_server.as_("auditor").audit.VerifyAuditLog(pb.VerifyAuditLogRequest(),
                                                                  timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_reason(info.value) == "AUDIT_UNAVAILABLE"
            assert time.monotonic() - started < 5
        assert _wait_for(lambda: _health(fault_server)
                         == health_pb2.HealthCheckResponse.NOT_SERVING)
        assert "(which ended HSM_UNAVAILABLE) fails closed" in fault_server.log()
    finally:
        for d in moved:
            d.rename(d.with_name(d.name[:-len(".away")]))
    assert _wait_for(lambda: _health(fault_server) == health_pb2.HealthCheckResponse.SERVING)
    r = fault_server.as_("auditor").audit.VerifyAuditLog(pb.VerifyAuditLogRequest(),
                                                         timeout=10)
    assert r.intact
    assert fault_server.proc.poll() is None


def test_a_file_call_while_the_hsm_is_away_fails_closed_and_audited_never_unknown(tmp_path):
    """A migration-file call's caller is admitted (the roster, read from the HSM; here on
    every call) before its file is read. With the HSM away that check fails: the call ends
    as any call does when its event cannot be kept, never UNKNOWN (review 6, session 17)."""
    fault_server = start_server(tmp_path / "state", env={"KEYSVC_ROSTER_REFRESH_SECONDS": "0"})
    try:
        _a_file_call_while_the_hsm_is_away(fault_server)
    finally:
        fault_server.stop()


def _a_file_call_while_the_hsm_is_away(fault_server) -> None:
    token_dirs = [d for d in (fault_server.state_dir / "hsm" / "tokens").iterdir()]
    moved = [d.rename(d.with_name(d.name + ".away")) for d in token_dirs]
    try:
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as info:
                fault_server.as_("s1sp").s1sp.ProcessGroupInformation(
                    pb.ProcessGroupInformationRequest(file=b"<x"), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_reason(info.value) == "AUDIT_UNAVAILABLE"
    finally:
        for d in moved:
            d.rename(d.with_name(d.name[:-len(".away")]))

    def file_read() -> bool:  # (again, once the HSM is back)
        try:
            fault_server.as_("s1sp").s1sp.ProcessGroupInformation(
                pb.ProcessGroupInformationRequest(file=b"<x"), timeout=10)
        except grpc.RpcError as exc:
            return error_reason(exc) == "MALFORMED_XML"
        return False
    assert _wait_for(file_read)
