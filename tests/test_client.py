"""keysvc.client for other components (issue 17, in part): typed errors built from the
status details, default deadlines, retries of idempotent calls only."""
from __future__ import annotations

import json

import pytest

from keysvc import client
from keysvc.api.v1 import keysvc_pb2 as pb


def _client(server, identity: str) -> client.Client:
    pki = server.state_dir / "pki"
    return client.Client.from_files(server.target, ca=pki / "ca.pem",
                                    cert=pki / f"{identity}.pem", key=pki / f"{identity}.key",
                                    server_name="localhost")


def test_a_refusal_is_its_own_exception_class_with_the_request_id(server):
    c = _client(server, "security-officer-1")
    with pytest.raises(client.KeyNotFound) as info:
        c.admin.GetKey(pb.GetKeyRequest(name="NO-SUCH-KEY"))
    assert info.value.reason == "KEY_NOT_FOUND" and len(info.value.request_id) == 16
    with pytest.raises(client.InvalidRequest) as info:
        c.admin.GetKey(pb.GetKeyRequest(name="x" * 100))
    assert info.value.field == "name"
    with pytest.raises(client.RoleNotPermitted):
        _client(server, "s1sp").audit.VerifyAuditLog(pb.VerifyAuditLogRequest())
    c.close()


def test_streams_raise_typed_errors_as_they_are_read(server):
    with pytest.raises(client.RoleNotPermitted):
        list(_client(server, "s1sp").audit.ExportAuditEvents(pb.ExportAuditEventsRequest()))


def test_only_calls_safe_to_repeat_are_retried():
    config = json.loads(client.service_config())
    names = {(n["service"], n["method"]) for n in config["methodConfig"][0]["name"]}
    assert ("keysvc.v1.S1SPService", "VerifyPrepaymentKey") in names
    for never in ("ReleaseRollbackCertificates", "ApproveOperation", "ImportTransportKey",
                  "EscrowRollbackCertificates", "EnrollOfficer", "CreateImportJob"):
        assert not any(m == never for _, m in names)
    assert config["methodConfig"][0]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
