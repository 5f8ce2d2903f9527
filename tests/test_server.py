"""The real `keysvc serve` process over mTLS: roles, transport security, health, reflection,
audit of every call, graceful shutdown, and the CLI as officers use it."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status

from keysvc.api.v1 import keysvc_pb2 as pb
from keysvc.client import Stubs, channel, error_from
from keysvc.pki import ensure_dev_pki
from tests.conftest import unique
from tests.serverproc import ROOT, server_env, start_server
from tests.support.encoder import build_file, kcv, random_installations

KEYSVC = str(ROOT / ".venv" / "bin" / "keysvc")


# --------------------------------------------------------------------------- helpers
def error_info(exc: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(exc)
    assert status is not None, exc
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError(f"no ErrorInfo in {exc}")


def audit_events(server, after_seq: int = 0) -> list:
    """Every audit event after `after_seq`, read page by page as the auditor."""
    audit = server.as_("auditor").audit
    events, token = [], str(after_seq)
    while True:
        r = audit.ListAuditEvents(pb.ListAuditEventsRequest(page_size=1000, page_token=token))
        events += r.events
        if not r.next_page_token:
            return events
        token = r.next_page_token


def last_audit_seq(server) -> int:
    """The newest sequence number; the listing call itself becomes the next event."""
    events = audit_events(server)
    return events[-1].sequence if events else 0


def health_check(ch: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(ch).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=10).status


# --------------------------------------------------------------------------- roles
def test_a_dco_certificate_calling_key_administration_is_denied_and_audited(server):
    before = last_audit_seq(server)
    with pytest.raises(grpc.RpcError) as exc:
        server.as_("dco").admin.ListKeys(pb.ListKeysRequest())

    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    info = error_info(exc.value)
    assert (info.reason, info.domain) == ("ROLE_NOT_PERMITTED", "keysvc")
    denied = [e for e in audit_events(server, before) if e.actor == "dco"]
    assert [(e.role, e.action, e.outcome, e.code) for e in denied] == [
        ("dco", "keysvc.v1.KeyAdministrationService/ListKeys", "DENIED", "ROLE_NOT_PERMITTED")]


# --------------------------------------------------------------------------- mTLS
def test_a_client_without_a_certificate_cannot_connect(server):
    ch = channel(server.target, server.state_dir / "pki", identity=None)
    try:
        with pytest.raises(grpc.RpcError) as exc:
            Stubs(ch).s1sp.VerifyPrepaymentKey(pb.VerifyPrepaymentKeyRequest(
                device_id="10-00-00-00-00-00-00-01", expected_kcv="00"), timeout=10)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        ch.close()


def test_a_client_with_a_certificate_from_another_ca_cannot_connect(server, tmp_path):
    other = tmp_path / "pki"
    ensure_dev_pki(other)  # another CA, with its own security-officer-1 certificate
    shutil.copy(server.state_dir / "pki" / "ca.pem", other / "ca.pem")  # trust the server
    ch = channel(server.target, other, identity="security-officer-1")
    try:
        with pytest.raises(grpc.RpcError) as exc:
            Stubs(ch).admin.ListKeys(pb.ListKeysRequest(), timeout=10)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        ch.close()


# --------------------------------------------------------------------------- health, reflection
def test_health_reports_serving(server):
    ch = server.as_("s1sp").channel
    assert health_check(ch) == health_pb2.HealthCheckResponse.SERVING
    assert health_check(ch, "keysvc.v1.S1SPService") == health_pb2.HealthCheckResponse.SERVING


def test_health_watch_streams_at_most_64_at_once_16_a_certificate_and_calls_go_on(server):
    """Watch sends the status at once. At most 16 Watch streams are open at once from one
    client certificate and 64 in all (one more: RESOURCE_EXHAUSTED TOO_MANY_STREAMS), so
    that no certificate shuts out the others'; they hold none of the calls' threads, and
    opening and cancelling them again and again stops nothing. (Review, session 16:
    gathered like an audited stream, 16 Watches stopped every call; run non-blocking, a
    cancel deadlocked the server; one certificate could hold every stream.)"""
    serving = health_pb2.HealthCheckResponse.SERVING
    stub = health_pb2_grpc.HealthStub(server.as_("auditor").channel)
    watches = []
    try:
        for who in ("auditor", "s1sp", "dco", "security-officer-1"):
            mine = health_pb2_grpc.HealthStub(server.as_(who).channel)
            watches += [mine.Watch(health_pb2.HealthCheckRequest(), timeout=30)
                        for _ in range(16)]
            assert [next(w).status for w in watches[-16:]] == [serving] * 16
            with pytest.raises(grpc.RpcError) as refused:
                next(mine.Watch(health_pb2.HealthCheckRequest(), timeout=10))
            assert error_info(refused.value).reason == "TOO_MANY_STREAMS"
            assert "one certificate" in refused.value.details()
        with pytest.raises(grpc.RpcError) as refused:  # (a fifth certificate: 64 in all)
            next(health_pb2_grpc.HealthStub(server.as_("security-officer-2").channel).Watch(
                health_pb2.HealthCheckRequest(), timeout=10))
        assert error_info(refused.value).reason == "TOO_MANY_STREAMS"
        assert "at most 64" in refused.value.details()
        server.as_("security-officer-1").admin.ListKeys(pb.ListKeysRequest(), timeout=10)
    finally:
        for w in watches:
            w.cancel()
    unexpected: list[str] = []

    def churn() -> None:
        for _ in range(40):
            try:
                w = stub.Watch(health_pb2.HealthCheckRequest(), timeout=10)
                next(w)
                w.cancel()
            except grpc.RpcError as exc:
                if error_info(exc).reason != "TOO_MANY_STREAMS":
                    unexpected.append(str(exc.code()))
    churners = [threading.Thread(target=churn) for _ in range(3)]
    [t.start() for t in churners]
    [t.join(60) for t in churners]
    assert unexpected == []
    assert health_check(server.as_("s1sp").channel) == serving
    server.as_("security-officer-1").admin.ListKeys(pb.ListKeysRequest(), timeout=10)


def test_health_watch_streams_are_left_when_their_clients_go_even_at_once(server):
    """A Watch cancelled as soon as it is opened is not kept: 300 of them, cancelled at
    once, and the 8 streams are all there to open again (review, session 16: the health
    servicer's own Watch kept about one in ten such streams for good)."""
    stub = health_pb2_grpc.HealthStub(server.as_("auditor").channel)
    for _ in range(300):
        stub.Watch(health_pb2.HealthCheckRequest(), timeout=10).cancel()
    deadline = time.monotonic() + 10
    while True:  # (a stream is left within a second of its client going)
        watches = [stub.Watch(health_pb2.HealthCheckRequest(), timeout=10) for _ in range(8)]
        try:
            statuses = [next(w).status for w in watches]
            break
        except grpc.RpcError as exc:
            assert error_info(exc).reason == "TOO_MANY_STREAMS" and time.monotonic() < deadline
        finally:
            for w in watches:
                w.cancel()
    assert statuses == [health_pb2.HealthCheckResponse.SERVING] * 8


def test_health_watch_of_a_service_it_does_not_report_answers_unknown_and_ends(server):
    """Any other name than a service this process reports (or "") is answered at once and
    not kept (the health servicer keeps every name it watched, for good; a request over
    4 KiB is refused unread)."""
    stub = health_pb2_grpc.HealthStub(server.as_("auditor").channel)
    answers = stub.Watch(health_pb2.HealthCheckRequest(service="x" * 4000), timeout=10)
    assert [a.status for a in answers] == [health_pb2.HealthCheckResponse.SERVICE_UNKNOWN]


def test_reflection_streams_at_most_eight_at_once_two_a_certificate_and_calls_go_on(server):
    """At most 2 reflection streams from one certificate, 8 in all, wait for their client's
    next request at once, holding none of the calls' threads: 16 idle ones held every
    thread of the calls (review, session 16)."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    hold = threading.Event()

    def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        hold.wait(30)
    streams = []
    try:
        for who in ("s1sp", "dco", "auditor", "security-officer-1"):
            stub = reflection_pb2_grpc.ServerReflectionStub(server.as_(who).channel)
            streams += [stub.ServerReflectionInfo(requests(), timeout=30) for _ in range(2)]
            for s in streams[-2:]:
                next(s)
            with pytest.raises(grpc.RpcError) as refused:
                next(stub.ServerReflectionInfo(requests(), timeout=10))
            assert error_info(refused.value).reason == "TOO_MANY_STREAMS"
        with pytest.raises(grpc.RpcError) as refused:
            next(reflection_pb2_grpc.ServerReflectionStub(
                server.as_("security-officer-2").channel).ServerReflectionInfo(
                    requests(), timeout=10))
        assert error_info(refused.value).reason == "TOO_MANY_STREAMS"
        server.as_("security-officer-1").admin.ListKeys(pb.ListKeysRequest(), timeout=10)
    finally:
        hold.set()
        for s in streams:
            s.cancel()


def test_calls_whose_message_never_comes_hold_no_thread_and_stop_no_call(server):
    """A call whose client opens it and never sends its request message holds nothing that
    other calls need: 40 such calls of a keysvc method (2.5x the 16 `workers`), 12 such
    Watches and 6 such reflection streams, and calls, Check and Watch still answer at once.
    (Review, session 16: the synchronous server gave each call its thread before its
    message came, and 16 of them stopped every call of a worker, unaudited; 9 such Watches
    made later Watches wait.)"""
    channel = server.as_("dco").channel
    never = threading.Event()

    def nothing():
        never.wait(60)
        return
        yield  # (a generator that sends no message)
    silent = [channel.stream_unary("/keysvc.v1.DCOService/VerifyMasterKey").future(
        nothing(), timeout=60) for _ in range(40)]
    silent += [channel.stream_stream(path)(nothing(), timeout=60) for path in
               ["/grpc.health.v1.Health/Watch"] * 12
               + ["/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"] * 6]
    try:
        time.sleep(1)  # (every one of them open at the server)
        officer = server.as_("security-officer-1").admin
        for _ in range(20):
            officer.ListKeys(pb.ListKeysRequest(), timeout=5)
        assert health_check(server.as_("s1sp").channel) == \
            health_pb2.HealthCheckResponse.SERVING
        watch = health_pb2_grpc.HealthStub(server.as_("auditor").channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=5)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
    finally:
        for call in silent:
            call.cancel()
        never.set()


def _unknown_fields(size: int) -> bytes:
    """A protobuf message of one unknown length-delimited field (number 2047) of `size`
    bytes: every parser takes it, and parsing it is the work."""
    def varint(n: int) -> bytes:
        out = b""
        while n >= 0x80:
            out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
        return out + bytes([n])
    return varint(2047 << 3 | 2) + varint(size) + b"\0" * size


def test_a_request_without_a_file_over_a_mebibyte_is_refused_unparsed_and_audited(server):
    """gRPC runs a deserializer on the event loop, before the role check: 120 MiB of
    unknown fields took 0.9 s to parse there, and four of them stopped every call for
    seconds, from any certificate (review, session 17). A request is now decoded in the
    calls' pool after the role check, and one over `limits.REQUEST_BYTES` (1 MiB) for a
    method that takes no migration file is INVALID_REQUEST unparsed, audited; health and
    reflection requests over 4 KiB are refused unparsed too."""
    big = _unknown_fields(2 * 1024 * 1024)
    method = "/keysvc.v1.KeyAdministrationService/ListKeys"
    before = last_audit_seq(server)
    with pytest.raises(grpc.RpcError) as refused:
        server.as_("security-officer-1").channel.unary_unary(method)(big, timeout=30)
    assert error_info(refused.value).reason == "INVALID_REQUEST"
    assert "1048576" in refused.value.details()
    with pytest.raises(grpc.RpcError) as denied:  # (the role first: nothing parsed for it)
        server.as_("dco").channel.unary_unary(method)(big, timeout=30)
    assert error_info(denied.value).reason == "ROLE_NOT_PERMITTED"
    small = _unknown_fields(1000)  # (unknown fields are allowed: a newer client's)
    server.as_("security-officer-1").channel.unary_unary(method)(small, timeout=30)
    assert [(e.actor, e.code) for e in audit_events(server, before)][1:] == [
        ("security-officer-1", "INVALID_REQUEST"), ("dco", "ROLE_NOT_PERMITTED"),
        ("security-officer-1", "OK")]
    channel = server.as_("dco").channel
    for path in ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"):
        with pytest.raises(grpc.RpcError) as refused:
            call = channel.unary_stream(path) if path.endswith("Watch") else \
                channel.unary_unary(path)
            answer = call(_unknown_fields(8192), timeout=10)
            next(answer) if path.endswith("Watch") else answer
        assert error_info(refused.value).reason == "INVALID_REQUEST"
    assert health_check(channel) == health_pb2.HealthCheckResponse.SERVING


def test_a_migration_file_request_is_its_file_and_nothing_else(server):
    """A migration-file request is read by hand, not by protobuf's parser, which holds
    the GIL for the whole message: 120 MiB of small unknown fields beside a file stopped
    every call for a second (review, session 17). Anything beside the file is
    INVALID_REQUEST, audited; the file itself goes on to its own checks."""
    method = "/keysvc.v1.DCOService/ValidateMasterKeys"
    dco = server.as_("dco").channel.unary_unary(method)
    with pytest.raises(grpc.RpcError) as refused:
        dco(pb.ValidateMasterKeysRequest(file=b"<x").SerializeToString()
            + _unknown_fields(100), timeout=30)
    assert error_info(refused.value).reason == "INVALID_REQUEST"
    with pytest.raises(grpc.RpcError) as malformed:  # (the file alone: its own checks)
        dco(pb.ValidateMasterKeysRequest(file=b"<x").SerializeToString(), timeout=30)
    assert error_info(malformed.value).reason == "MALFORMED_XML"


def test_a_path_that_names_no_method_is_unimplemented(server):
    """Any client may send any path: one without a service and a method is gRPC's
    UNIMPLEMENTED, never a crash in the interceptor (review, session 17)."""
    for path in ("x", "", "/", "/keysvc.v1.S1SPService"):
        with pytest.raises(grpc.RpcError) as refused:
            server.as_("s1sp").channel.unary_unary(path)(b"", timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, path


def test_a_file_call_without_its_message_is_refused_and_not_run(server):
    """A migration-file call is read as a stream of its one message (gRPC keeps a unary
    call's bytes to its end): one that half-closes with no message is INVALID_REQUEST, and
    one whose client goes before its message is not run either. Neither is audited: the
    client made no request. (Review, session 17: both ran as an empty file, audited
    MALFORMED_XML.)"""
    channel = server.as_("dco").channel
    method = "/keysvc.v1.DCOService/ValidateMasterKeys"
    before = last_audit_seq(server)
    with pytest.raises(grpc.RpcError) as refused:
        channel.stream_unary(method)(iter(()), timeout=10)
    assert error_info(refused.value).reason == "INVALID_REQUEST"
    never = threading.Event()

    def nothing():
        never.wait(30)
        return
        yield
    gone = channel.stream_unary(method).future(nothing(), timeout=30)
    time.sleep(0.5)
    gone.cancel()
    never.set()
    time.sleep(0.5)
    assert [e.action.rsplit("/", 1)[1] for e in audit_events(server, before)] == [
        "ListAuditEvents"]  # (the listing that found `before`)


def test_a_file_call_of_the_wrong_role_is_refused_without_its_file_read(server):
    """A migration-file call is refused (and audited) before its file is read when its
    certificate may not send it: four 120 MiB files from a caller of the wrong role took
    a server to 1 GB (review, session 17). Here the file never comes, and the refusal does
    not wait for it."""
    never = threading.Event()

    def nothing():
        never.wait(30)
        return
        yield
    try:
        with pytest.raises(grpc.RpcError) as refused:
            server.as_("dco").channel.stream_unary(
                "/keysvc.v1.S1SPService/ProcessGroupInformation")(nothing(), timeout=20)
        assert error_info(refused.value).reason == "ROLE_NOT_PERMITTED"
    finally:
        never.set()


def test_file_calls_at_most_eight_of_a_partition_and_their_places_come_back(server):
    """A process takes in at most 8 migration-file calls of a partition at once (each holds
    up to 129 MiB; the synchronous server's 16 threads bounded them, the event loop does
    not): one more is RESOURCE_EXHAUSTED
    TOO_MANY_FILE_CALLS at once, the other organisation's calls are not counted, and a
    place comes back whenever its call ends, its client gone or not (a waiting limit
    leaked its places to cancels: review, session 17)."""
    never = threading.Event()

    def nothing():
        never.wait(30)
        return
        yield
    path = "/keysvc.v1.S1SPService/ProcessGroupInformation"
    s1sp = server.as_("s1sp").channel.stream_unary(path)
    file = pb.ProcessGroupInformationRequest(file=b"<x")
    try:
        for _ in range(10):  # (places taken and left by cancels, again and again)
            silent = [s1sp.future(nothing(), timeout=30) for _ in range(8)]
            time.sleep(0.3)
            with pytest.raises(grpc.RpcError) as refused:
                server.as_("s1sp").s1sp.ProcessGroupInformation(file, timeout=10)
            assert error_info(refused.value).reason == "TOO_MANY_FILE_CALLS"
            assert error_from(refused.value).retry_after == 1  # (RetryInfo: a caller waits)
            with pytest.raises(grpc.RpcError) as served:
                server.as_("dco").dco.ValidateMasterKeys(
                    pb.ValidateMasterKeysRequest(file=b"<x"), timeout=10)
            assert error_info(served.value).reason == "MALFORMED_XML"
            for call in silent:
                call.cancel()
            time.sleep(0.3)
    finally:
        never.set()
    with pytest.raises(grpc.RpcError) as served:
        server.as_("s1sp").s1sp.ProcessGroupInformation(file, timeout=10)
    assert error_info(served.value).reason == "MALFORMED_XML"


# Appends `count` events to the chain of the server on STATE (as a second process of the
# same keysvc would: its own writer, the same tokens and database), 1,000 a batch.
_LENGTHEN_THE_CHAIN = """
import sys, uuid
from keysvc import config
from keysvc.app import App
from keysvc.audit.chain import AuditEvent
app = App.open(config.load(state_dir=sys.argv[1]))
try:
    for _ in range(int(sys.argv[2]) // 1000):
        app.audit.writer.submit([AuditEvent(str(uuid.uuid4()), app.audit.clock(), "test",
                                            "auditor", "test/Lengthen", "", "OK", "OK")
                                 for _ in range(1000)])
finally:
    app.close()
"""


def test_the_audit_trails_calls_take_no_thread_of_the_other_calls(tmp_path):
    """VerifyAuditLog reads the whole chain (here 15,000 events, seconds): the audit
    trail's calls have threads of their own, so a server with one thread for the other
    calls (`workers = 1`) answers the S1SP while an auditor verifies; four verifications
    held every thread of the pool (review, session 18). One certificate has at most two
    of them at once: abandoned verifications queued for minutes (review 2)."""
    srv = start_server(tmp_path / "state", env={"KEYSVC_WORKERS": "1"})
    try:
        subprocess.run([sys.executable, "-c", _LENGTHEN_THE_CHAIN, str(srv.state_dir),
                        "15000"], env=server_env(), cwd=ROOT, check=True, timeout=120)
        auditor, s1sp = srv.as_("auditor").audit, srv.as_("s1sp").s1sp
        verifying = [auditor.VerifyAuditLog.future(pb.VerifyAuditLogRequest(), timeout=120)
                     for _ in range(2)]
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as busy:  # (two of a certificate at once)
            auditor.ListAuditEvents(pb.ListAuditEventsRequest(page_size=1), timeout=10)
        assert error_info(busy.value).reason == "TOO_MANY_AUDIT_CALLS"
        assert error_from(busy.value).retry_after == 1
        officer = srv.as_("security-officer-1").audit.ListAuditEvents.future(
            pb.ListAuditEventsRequest(page_size=1), timeout=120)  # (another: it waits its turn)
        answered = 0
        while not all(v.done() for v in verifying):
            with pytest.raises(grpc.RpcError) as refused:
                s1sp.VerifyPrepaymentKey(pb.VerifyPrepaymentKeyRequest(
                    device_id="00-00-00-00-00-00-00-02", expected_kcv="0000000000"),
                    timeout=120)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
            answered += not all(v.done() for v in verifying)
            time.sleep(0.2)
        assert all(v.result().intact for v in verifying)
        assert len(officer.result().events) == 1
        assert answered >= 3
    finally:
        assert srv.stop() == 0


def test_reflection_lists_the_s1sp_service(server):
    services = ProtoReflectionDescriptorDatabase(server.as_("s1sp").channel).get_services()
    assert "keysvc.v1.S1SPService" in services
    assert "grpc.health.v1.Health" in services


# --------------------------------------------------------------------------- audit
def test_every_call_allowed_or_denied_appends_one_audit_event_and_the_log_verifies(server):
    before = last_audit_seq(server)
    server.as_("security-officer-1").admin.ListKeys(pb.ListKeysRequest())
    with pytest.raises(grpc.RpcError):
        server.as_("s1sp").admin.ListKeys(pb.ListKeysRequest())
    with pytest.raises(grpc.RpcError):
        server.as_("s1sp").s1sp.VerifyPrepaymentKey(pb.VerifyPrepaymentKeyRequest(
            device_id="10-00-00-00-00-00-00-02", expected_kcv="0000000000"))
    health_check(server.as_("s1sp").channel)  # health is not audited

    events = audit_events(server, before)
    assert [(e.actor, e.action.rsplit("/", 1)[1], e.outcome, e.code) for e in events] == [
        ("auditor", "ListAuditEvents", "OK", "OK"),  # the listing that found `before`
        ("security-officer-1", "ListKeys", "OK", "OK"),
        ("s1sp", "ListKeys", "DENIED", "ROLE_NOT_PERMITTED"),
        ("s1sp", "VerifyPrepaymentKey", "ERROR", "DEVICE_KEY_NOT_FOUND"),
    ]
    assert [e.sequence for e in events] == list(range(before + 1, before + 5))

    verdict = server.as_("auditor").audit.VerifyAuditLog(pb.VerifyAuditLogRequest())
    assert verdict.intact, verdict
    assert verdict.events_checked >= before + 5


# --------------------------------------------------------------------------- shutdown
def _a_file_of(srv, installations: int) -> bytes:
    """An S1SP file, its key imported (6,000 installations: a few seconds of HSM work)."""
    name, kek = unique("S1SP-TK"), os.urandom(32)
    srv.import_aes_key(name, kek, purpose="S1SP_TRANSPORT", owner_id="SMSO-LG-01")
    return build_file(random_installations(installations, group="AA"), group_id="AA",
                      file_id=unique("MGEF"), s1sp_key_name=name, s1sp_kek=kek,
                      dco_key_name="DCO-UNUSED", dco_kek=os.urandom(32))


def _a_file_of_6000_installations(srv) -> bytes:
    return _a_file_of(srv, 6000)


def _a_file_call(channel, requests) -> grpc.Future:
    """ProcessGroupInformation whose one message is sent when `requests` yields it (the
    wire is the unary stub's)."""
    return channel.stream_unary(
        "/keysvc.v1.S1SPService/ProcessGroupInformation",
        request_serializer=pb.ProcessGroupInformationRequest.SerializeToString,
        response_deserializer=pb.ProcessGroupInformationResponse.FromString,
    ).future(requests, timeout=60)


def _wait_for_the_file_to_arrive(srv) -> None:
    """Until the call is at its work (the server logs a file's arrival)."""
    deadline = time.monotonic() + 30
    while '"msg":"file received"' not in srv.log() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_sigterm_drains_the_call_in_flight_tells_health_watchers_and_exits_zero(tmp_path):
    srv = start_server(tmp_path / "state")
    try:
        big = _a_file_of_6000_installations(srv)
        call = srv.as_("s1sp").s1sp.ProcessGroupInformation.future(
            pb.ProcessGroupInformationRequest(file=big), timeout=60)
        watch = health_pb2_grpc.HealthStub(srv.as_("auditor").channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        # SIGTERM once the call is being processed (about 3 s of HSM work), not while the
        # file is still being received: the server logs a file's arrival.
        _wait_for_the_file_to_arrive(srv)
        srv.proc.send_signal(signal.SIGTERM)

        # A balancer watching health hears NOT_SERVING at once, then its stream ends (an
        # open Watch never ends by itself: the drain would wait its whole grace for it).
        assert [r.status for r in watch] == [health_pb2.HealthCheckResponse.NOT_SERVING]
        assert call.result().accepted_count == 6000
        assert srv.proc.wait(30) == 0
    finally:
        assert srv.stop() == 0
    log = srv.log()
    assert log.index("draining in-flight calls") < log.index('"method":"ProcessGroupInformation"')
    assert '"msg":"stopped"' in log


def _went_away_after(states: list, answered: float) -> bool:
    """Whether a channel left READY (heard GOAWAY) only once its call was answered (its
    callbacks come from a thread of their own: a moment's leeway)."""
    ready = next(i for i, (_, state) in enumerate(states)
                 if state == grpc.ChannelConnectivity.READY)
    went_away = [at for at, state in states[ready:] if state != grpc.ChannelConnectivity.READY]
    return bool(went_away) and min(went_away) > answered - 0.5


@pytest.mark.parametrize("signalled", ["at work", "while the file comes"])
def test_a_call_being_answered_at_a_stop_keeps_its_connection_until_it_is(tmp_path,
                                                                          signalled):
    """The server says GOAWAY only once the calls being answered have been: gRPC closes a
    connection that had GOAWAY the moment its last call ends, and the kernel resets one
    closed with the client's last frames unread, dropping what the client had not read
    yet. A migration file's 1 MiB answer was lost so (UNAVAILABLE "Connection reset by
    peer", CI, session 19; reproduced with a client receive buffer of 16 KiB); so was one
    whose file was still on its way at the signal (review 1). A client hears GOAWAY as its
    channel leaving READY."""
    srv = start_server(tmp_path / "state")
    try:
        big = _a_file_of_6000_installations(srv)
        s1sp = srv.as_("s1sp")
        states: list[tuple[float, grpc.ChannelConnectivity]] = []
        s1sp.channel.subscribe(lambda state: states.append((time.monotonic(), state)))
        signalled_at = threading.Event()
        grpc.channel_ready_future(s1sp.channel).result(timeout=30)  # (a slow handshake)

        def the_file():  # (sent a second after the signal, when signalled so)
            if signalled == "while the file comes":
                signalled_at.wait(30)
                time.sleep(1.0)
            yield pb.ProcessGroupInformationRequest(file=big)
        call = _a_file_call(s1sp.channel, the_file())
        if signalled == "at work":
            _wait_for_the_file_to_arrive(srv)
        else:
            time.sleep(1.0)  # (the call has begun: gRPC has its headers)
        srv.proc.send_signal(signal.SIGTERM)
        signalled_at.set()
        assert call.result().accepted_count == 6000
        answered = time.monotonic()
        assert srv.proc.wait(30) == 0
        assert _went_away_after(states, answered), (states, answered)
    finally:
        assert srv.stop() == 0


def test_a_long_call_that_comes_once_a_stop_is_quiet_is_refused_server_stopping(tmp_path):
    """Once a stop has served NOT_SERVING a moment, a new migration-file or audit-trail
    call is refused UNAVAILABLE SERVER_STOPPING (a client repeats it elsewhere), not
    started: one started while the calls being answered end could be cut off at the
    grace, its work done and its answer lost (review 1, session 19). A small call is
    served: a client whose connection stays with the replica (an L4 balancer) had every
    one refused while the stop waited (review 2). The stop is held open by a file call
    whose file comes only once the checks are done."""
    srv = start_server(tmp_path / "state")
    try:
        s1sp = srv.as_("s1sp")
        small_file = _a_file_of(srv, 10)
        grpc.channel_ready_future(s1sp.channel).result(timeout=30)
        checked = threading.Event()

        def the_file():
            checked.wait(30)
            yield pb.ProcessGroupInformationRequest(file=small_file)
        held = _a_file_call(s1sp.channel, the_file())
        time.sleep(1.0)  # (the call has begun: gRPC has its headers)
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while "draining in-flight calls" not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)  # (quiet: no call has started for a quarter of a second)
        try:
            srv.as_("security-officer-1").admin.ListKeys(pb.ListKeysRequest(), timeout=10)
            for long in (lambda: srv.as_("dco").dco.ValidateMasterKeys(
                             pb.ValidateMasterKeysRequest(file=small_file), timeout=10),
                         lambda: srv.as_("auditor").audit.VerifyAuditLog(
                             pb.VerifyAuditLogRequest(), timeout=10)):
                with pytest.raises(grpc.RpcError) as refused:
                    long()
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert error_info(refused.value).reason == "SERVER_STOPPING"
        finally:
            checked.set()
        assert held.result().accepted_count == 10
        assert srv.proc.wait(30) == 0
    finally:
        assert srv.stop() == 0


def test_sigterm_finishes_audits_and_logs_a_call_whose_client_gave_up_and_ends_idle_streams(
        tmp_path):
    """A client that cancels while the server drains stops waiting for its answer, not the
    call: its work ends, its audit event is kept and its log line written before the
    process exits. An idle reflection stream is ended at once, so that the
    drain does not wait its whole grace (30 s) for it. (Review, session 16: on the first
    aio server such calls lost their event and log line at a stop.)"""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    srv = start_server(tmp_path / "state")
    try:
        big = _a_file_of_6000_installations(srv)
        idle = threading.Event()

        def requests():
            yield reflection_pb2.ServerReflectionRequest(list_services="")
            idle.wait(60)
        stream = reflection_pb2_grpc.ServerReflectionStub(srv.as_("s1sp").channel)\
            .ServerReflectionInfo(requests(), timeout=60)
        next(stream)
        call = srv.as_("s1sp").s1sp.ProcessGroupInformation.future(
            pb.ProcessGroupInformationRequest(file=big), timeout=60)
        _wait_for_the_file_to_arrive(srv)
        srv.proc.send_signal(signal.SIGTERM)
        call.cancel()
        assert list(stream) == []  # (ended, where it would wait for its next request)
        idle.set()
        assert srv.proc.wait(20) == 0  # (not the 30 s grace)
    finally:
        assert srv.stop() == 0
    log = srv.log()
    assert re.search(r'"method":"ProcessGroupInformation","code":"OK"', log), log[-2000:]
    again = start_server(tmp_path / "state")
    try:
        assert [(e.actor, e.outcome) for e in audit_events(again)
                if e.action.endswith("/ProcessGroupInformation")] == [("s1sp", "OK")]
    finally:
        again.stop()


def test_sigterm_as_soon_as_it_listens_drains_and_exits_zero(tmp_path):
    """The signal handlers are there before the port listens: a SIGTERM right after
    READY killed the first aio server (exit -15; review, session 17)."""
    import sys

    from tests.serverproc import free_port
    for i in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-m", "keysvc.cli", "serve", "--state-dir",
             str(tmp_path / f"state-{i}"), "--listen", f"127.0.0.1:{free_port()}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, env=server_env(None),
            start_new_session=True)
        try:
            for line in proc.stdout:  # (SIGTERM the moment it says so)
                if line.startswith(b"listening on"):
                    proc.send_signal(signal.SIGTERM)
                    break
            rest = proc.stdout.read()
            assert proc.wait(30) == 0
            assert b'"msg":"stopped"' in rest
        finally:
            proc.kill()
            proc.wait()


def test_sigterm_in_a_burst_of_calls_cancels_none_it_had_taken(tmp_path):
    """Calls the server had taken but not started when SIGTERM came are served, not
    answered CANCELLED (which no client retries, and which tells a client making a change
    nothing): it serves on, NOT_SERVING, until no call has started for a quarter of a
    second. (Review, session 17: 124 of 150 CANCELLED.) Calls that come after its port
    closed are UNAVAILABLE, which a client retries; so is a file call whose file has not
    come 10 s before the grace ends (it held the stop for its whole grace)."""
    srv = start_server(tmp_path / "state")
    try:
        officer = srv.as_("security-officer-1").admin
        officer.ListKeys(pb.ListKeysRequest(), timeout=30)
        never = threading.Event()

        def nothing():
            never.wait(60)
            return
            yield  # (a file call whose file never comes)
        silent = srv.as_("dco").channel.stream_unary(
            "/keysvc.v1.DCOService/ValidateMasterKeys").future(nothing(), timeout=60)
        calls = [officer.ListKeys.future(pb.ListKeysRequest(), timeout=60)
                 for _ in range(300)]
        time.sleep(0.15)
        srv.proc.send_signal(signal.SIGTERM)
        assert error_info(silent.exception()).reason == "SERVER_STOPPING"
        never.set()
        codes = []
        for c in calls:
            try:
                c.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    served = srv.log().count('"method":"ListKeys","code":"OK"')
    assert served == codes.count(grpc.StatusCode.OK) + 1


def test_with_no_flags_it_keeps_its_state_in_dot_keysvc_and_listens_on_127_0_0_1_50051(
        tmp_path):
    """api.md, Running: the embedded development default."""
    import socket
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 50051)) == 0:
            pytest.skip("something already listens on 127.0.0.1:50051 (a `make run`?)")
    proc = subprocess.Popen([KEYSVC, "serve"], cwd=tmp_path, env=server_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline, out = time.monotonic() + 90, b""
        while b"listening on" not in out and time.monotonic() < deadline:
            out += proc.stdout.readline()
        assert b"listening on 127.0.0.1:50051" in out, out.decode()
        pki = tmp_path / ".keysvc" / "pki"
        assert {p.name for p in pki.iterdir()} >= {
            "ca.pem", *(f"{n}.{e}" for n in ("s1sp", "dco", "security-officer-1",
                                             "security-officer-2", "auditor")
                        for e in ("pem", "key"))}
        with channel("127.0.0.1:50051", pki, "auditor") as ch:
            assert health_check(ch) == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_the_server_certificate_names_localhost_and_127_0_0_1(server, host):
    """Checked by gRPC itself: no target-name override on this channel."""
    port = server.target.rsplit(":", 1)[1]
    pki = server.state_dir / "pki"
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / "auditor.key").read_bytes(),
        certificate_chain=(pki / "auditor.pem").read_bytes())
    with grpc.secure_channel(f"{host}:{port}", creds) as ch:
        assert health_check(ch) == health_pb2.HealthCheckResponse.SERVING


# --------------------------------------------------------------------------- CLI
def keysvc_cli(server, *args: str, input: str | None = None) -> str:
    r = subprocess.run([KEYSVC, *args, "--state-dir", str(server.state_dir),
                        "--server", server.target], env=server_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=60, input=input)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_cli_imports_a_key_a_second_officer_approves_and_keys_lists_its_kcv(server, tmp_path):
    name, key = unique("CLI-TK"), os.urandom(32)
    key_file = tmp_path / "key.hex"
    key_file.write_text(key.hex())

    out = keysvc_cli(server, "admin", "import-key", "--name", name, "--purpose",
                     "S1SP_TRANSPORT", "--owner-id", "SMSO-LG-01", "--kcv", kcv(key),
                     "--key-file", str(key_file))
    op_id = re.search(r"op-[0-9a-f]{16}", out).group(0)
    assert "PENDING" in out

    out = keysvc_cli(server, "admin", "approve", op_id, "--as", "security-officer-2",
                     input="y\n")
    assert "request digest" in out and "SMSO-LG-01" in out and kcv(key) in out
    assert "APPROVED" in out

    rows = [line for line in keysvc_cli(server, "admin", "keys").splitlines() if name in line]
    assert len(rows) == 1 and kcv(key) in rows[0] and "ENABLED" in rows[0]


# api.md: "Request messages are `<Rpc>Request`, responses `<Rpc>Response` unless a type is
# named" - and it names these three.
NAMED_RESPONSES = {"VerifyDeviceCertificate": "CertificateVerdict",
                   "ValidateMasterKeys": "MasterKeysResult", "UnwrapMasterKeys": "MasterKeysResult",
                   "ImportTransportKey": "Operation", "GenerateRecipientKey": "Operation",
                   "ApproveOperation": "Operation",
                   # keysvc additions: an officer or deny-list change is an Operation.
                   "EnrollOfficer": "Operation", "RemoveOfficer": "Operation",
                   "DenyCertificate": "Operation", "AllowCertificate": "Operation",
                   # and a key version made or destroyed (issue 15).
                   "RotateKey": "Operation", "DestroyKeyVersion": "Operation",
                   "ExportAuditEvents": "ChainedAuditEvent"}


def test_every_rpc_has_the_request_and_response_message_names_api_md_gives():
    from keysvc.api.v1 import keysvc_pb2
    for service in keysvc_pb2.DESCRIPTOR.services_by_name.values():
        for m in service.methods:
            assert m.input_type.name == f"{m.name}Request", m.full_name
            assert m.output_type.name == NAMED_RESPONSES.get(m.name, f"{m.name}Response"), \
                m.full_name


def test_every_service_has_its_roles_and_one_without_is_refused_to_everyone():
    """Deny by default: the interceptor refuses a service missing from SERVICE_ROLES."""
    from keysvc.api.v1 import keysvc_pb2
    from keysvc.server import SERVICE_ROLES
    assert {s.full_name for s in keysvc_pb2.DESCRIPTOR.services_by_name.values()} == \
        set(SERVICE_ROLES)
    assert SERVICE_ROLES.get("keysvc.v1.NewService", frozenset()) == frozenset()
