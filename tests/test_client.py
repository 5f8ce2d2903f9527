"""keysvc.client for other components (issue 17, in part): typed errors built from the
status details, default deadlines, retries of idempotent calls only."""
from __future__ import annotations

import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

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


def test_a_future_has_the_default_deadline_and_raises_typed_errors(server):
    c = _client(server, "security-officer-1")
    future = c.admin.GetKey.future(pb.GetKeyRequest(name="NO-SUCH-KEY"))
    with pytest.raises(client.KeyNotFound):
        future.result()
    assert future.done()
    c.close()


def test_streams_raise_typed_errors_as_they_are_read(server):
    with pytest.raises(client.RoleNotPermitted):
        list(_client(server, "s1sp").audit.ExportAuditEvents(pb.ExportAuditEventsRequest()))


@contextlib.contextmanager
def _every_file_place_taken(server):
    """The S1SP partition's 8 file places held by calls that never send their file; yields
    those calls (cancel them to free the places)."""
    never = threading.Event()

    def nothing():
        never.wait(30)
        return
        yield
    s1sp = server.as_("s1sp").channel.stream_unary(
        "/keysvc.v1.S1SPService/ProcessGroupInformation")
    silent = [s1sp.future(nothing(), timeout=30) for _ in range(8)]
    try:
        time.sleep(0.3)
        yield silent
    finally:
        never.set()
        for call in silent:
            call.cancel()


def test_a_file_call_refused_for_too_many_file_calls_is_sent_again_once_a_place_frees(server):
    """TOO_MANY_FILE_CALLS carries RetryInfo: the client waits and sends the file again,
    within the call's deadline, rather than failing (review, session 17)."""
    c = _client(server, "s1sp")
    with _every_file_place_taken(server) as silent, ThreadPoolExecutor(1) as pool:
        sent = pool.submit(c.s1sp.ProcessGroupInformation,
                           pb.ProcessGroupInformationRequest(file=b"<x"), timeout=20)
        time.sleep(2.5)  # (refused at least twice meanwhile)
        assert not sent.done()
        for call in silent:
            call.cancel()
        with pytest.raises(client.MalformedXml):  # its turn came: the file was read
            sent.result()
    c.close()


def test_a_file_call_is_not_sent_again_past_its_deadline(server):
    c = _client(server, "s1sp")
    with _every_file_place_taken(server), pytest.raises(client.TooManyFileCalls):
        c.s1sp.ProcessGroupInformation(pb.ProcessGroupInformationRequest(file=b"<x"),
                                       timeout=0.9)  # (less than RetryInfo says)
    c.close()


def test_a_refused_file_call_waits_longer_each_time_and_other_calls_are_not_repeated():
    """A refused attempt has sent part of its file (12-21 MiB of 64; review, session 18):
    the waits double from the server's RetryInfo to 30 s (with up to half again of jitter),
    and UNAVAILABLE is tried four times in all, as gRPC's policy does."""
    import grpc
    busy = client.TooManyFileCalls(grpc.StatusCode.RESOURCE_EXHAUSTED, "", retry_after=1.0)
    away = client.HsmUnavailable(grpc.StatusCode.UNAVAILABLE, "")
    file = client._Method("ProcessGroupInformation", None)
    waits = [file._again_after(busy, n) for n in range(1, 10)]
    assert 1.0 <= waits[0] <= 1.5 and 16.0 <= waits[4] <= 24.0
    assert all(30.0 <= w <= 45.0 for w in waits[5:])
    assert file._again_after(away, 3) is not None and file._again_after(away, 4) is None
    odd = client.HsmUnavailable(grpc.StatusCode.UNAVAILABLE, "", retry_after=-5.0)
    assert 0.2 <= file._again_after(odd, 1) <= 0.3  # (a negative RetryInfo: as none)
    assert client._Method("VerifyPrepaymentKey", None)._again_after(busy, 1) is None


def test_only_calls_safe_to_repeat_are_retried():
    config = json.loads(client.service_config())
    names = {(n["service"], n["method"]) for n in config["methodConfig"][0]["name"]}
    assert ("keysvc.v1.S1SPService", "VerifyPrepaymentKey") in names
    for never in ("ReleaseRollbackCertificates", "ApproveOperation", "ImportTransportKey",
                  "EscrowRollbackCertificates", "EnrollOfficer", "CreateImportJob"):
        assert not any(m == never for _, m in names)
    assert config["methodConfig"][0]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    # The file calls: repeated by the client itself (gRPC's retry buffer holds no file).
    assert not any(m in client.FILE_METHODS for _, m in names)


def test_every_reason_keysvc_raises_has_its_own_exception_class():
    """Each `error("CODE", ...)` in keysvc/ names a reason of the one table, and so a class
    of keysvc.client (an unknown code would be INTERNAL, never a typed error)."""
    import re
    from pathlib import Path
    root = Path(client.__file__).parent
    used = {m for path in root.rglob("*.py") if "api" not in path.parts
            for m in re.findall(r'\berror\(\s*"([A-Z_]+)"', path.read_text())}
    assert used and used <= set(client.ERRORS), used - set(client.ERRORS)
    for reason, cls in client.ERRORS.items():
        assert cls.reason == reason and issubclass(cls, client.KeysvcCallError)
        assert getattr(client, cls.__name__) is cls


def test_real_refusals_from_every_service_reach_their_own_classes(server):
    """One real refusal per service kind and status, each caught as its own class."""
    officer, s1sp = _client(server, "security-officer-1"), _client(server, "s1sp")
    dco, auditor = _client(server, "dco"), _client(server, "auditor")
    unknown_device = "10-FF-FF-FF-FF-FF-FF-FE"
    refusals = [
        (lambda: officer.admin.GetOperation(pb.GetOperationRequest(operation_id="op-none")),
         client.OperationNotFound),
        (lambda: officer.admin.RevokeEscrow(pb.RevokeEscrowRequest(escrow_id="esc-none",
                                                                    reason="test")),
         client.EscrowNotFound),
        (lambda: officer.admin.RemoveOfficer(pb.RemoveOfficerRequest(display_name="nobody")),
         client.OfficerNotFound),
        (lambda: s1sp.s1sp.VerifyPrepaymentKey(pb.VerifyPrepaymentKeyRequest(
            device_id=unknown_device, expected_kcv="0000000000")), client.DeviceKeyNotFound),
        (lambda: s1sp.s1sp.VerifyPrepaymentKey(pb.VerifyPrepaymentKeyRequest(
            device_id="not-an-eui", expected_kcv="0000000000")), client.InvalidEui64),
        (lambda: s1sp.s1sp.ProcessGroupInformation(pb.ProcessGroupInformationRequest(
            file=b"<a>")), client.MalformedXml),
        (lambda: dco.dco.UnwrapMasterKeys(pb.UnwrapMasterKeysRequest(
            file=b"<a xmlns='urn:x'/>")), client.SchemaInvalid),
        (lambda: dco.dco.VerifyMasterKey(pb.VerifyMasterKeyRequest(
            device_id=unknown_device, expected_kcv="0000000000")), client.DeviceKeyNotFound),
        (lambda: auditor.s1sp.VerifyPrepaymentKey(pb.VerifyPrepaymentKeyRequest()),
         client.RoleNotPermitted),
    ]
    for call, cls in refusals:
        with pytest.raises(client.KeysvcCallError, match=cls.reason) as info:
            call()
        assert type(info.value) is cls, (cls.__name__, info.value)
        assert len(info.value.request_id) == 16
    for c in (officer, s1sp, dco, auditor):
        c.close()


def test_the_client_receives_a_large_file_result_and_sends_a_large_file(monkeypatch):
    """gRPC receives 4 MiB by default; a file of 30,000 installations gives a result of
    some 10 MB and is 55 MB itself. The Client (and so the CLI) allows 256 MiB both ways."""
    seen = {}

    def channel(target, creds, options=()):
        seen.update(options)
        return "channel"
    monkeypatch.setattr(client.grpc, "secure_channel", channel)
    client.Client.from_pem("x:1", ca=b"", cert=b"", key=b"")
    assert seen["grpc.max_receive_message_length"] == 256 * 1024 * 1024
    assert seen["grpc.max_send_message_length"] == 256 * 1024 * 1024
    assert seen["grpc.enable_retries"] == 1
