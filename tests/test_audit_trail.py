"""An audit trail no one can silence (issue 14), through real servers: each effect and its
event commit together, also under kill -9; a call whose event cannot be kept fails closed
(a real outside write lock, real SQLite triggers, an audit file that cannot be written), in
bounded time and visibly in health and metrics; every event also goes to a JSON-lines file
and to syslog over TLS, and VerifyAuditLog names the first difference; the chain is exported
from a cursor."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keysvc.api.v1 import keysvc_pb2 as pb
from keysvc.client import error_reason
from keysvc.pki import ensure_dev_pki
from tests.conftest import unique
from tests.serverproc import ROOT, free_port, server_env, start_server
from tests.support.encoder import kcv
from tests.support.waiting import until as _until

FAST = {"KEYSVC_AUDIT_TIMEOUT_SECONDS": "2"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("audit-trail"), env=FAST)
    yield s
    s.stop()


def _db(server) -> sqlite3.Connection:
    return sqlite3.connect(server.state_dir / "keysvc.db", timeout=30, isolation_level=None)


def _audit_file(server) -> Path:
    (path,) = [p for p in (server.state_dir / "audit").glob("audit-*.jsonl")]
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _import(server, name: str | None = None):
    key, c1 = os.urandom(32), os.urandom(32)
    return server.as_("security-officer-1").admin.ImportTransportKey(
        pb.ImportTransportKeyRequest(name=name or unique("AUD-TK"), purpose=pb.S1SP_TRANSPORT,
                                     owner_id="SMSO-A", owner_type=pb.SMSO,
                                     expected_kcv=kcv(key), component=c1))


def _reason(call) -> str:
    try:
        call()
        return ""
    except grpc.RpcError as exc:
        return error_reason(exc)


def _export(server, since: int = 0, limit: int = 10_000) -> list:
    return list(server.as_("auditor").audit.ExportAuditEvents(
        pb.ExportAuditEventsRequest(since_sequence=since, limit=limit)))


def _verify(server):
    return server.as_("auditor").audit.VerifyAuditLog(pb.VerifyAuditLogRequest())


def _health(server) -> int:
    stub = health_pb2_grpc.HealthStub(server.as_("auditor").channel)
    return stub.Check(health_pb2.HealthCheckRequest(service="")).status


def _ops_and_events(server) -> tuple[set[str], dict[str, list]]:
    db = _db(server)
    ops = {r[0] for r in db.execute("SELECT target FROM operations "
                                    "WHERE kind = 'IMPORT_TRANSPORT_KEY'")}
    events: dict[str, list] = {}
    for target, outcome in db.execute(
            "SELECT target, outcome FROM audit_events WHERE action = "
            "'keysvc.v1.KeyAdministrationService/ImportTransportKey'"):
        events.setdefault(target, []).append(outcome)
    # A request whose anchor reached the token just before a kill, and whose row start-up
    # rolled forward: that roll-forward is the effect, with its own event.
    for (target,) in db.execute("SELECT target FROM audit_events WHERE action = "
                                "'record.rolled_forward' AND target LIKE 'operations/%'"):
        name = target.split("IMPORT_TRANSPORT_KEY ", 1)[-1].split(" ", 1)[0]
        events.setdefault(name, []).append("OK")
    intents = db.execute("SELECT count(*) FROM audit_intents").fetchone()[0]
    db.close()
    return ops, events | {"__intents__": [intents]}


# --------------------------------------------------------------------------- one transaction
def test_every_committed_effect_has_its_event_after_kill_9s_under_load(tmp_path):
    state = tmp_path / "killed"
    server = start_server(state, env=FAST)
    for round_ in range(3):
        stop = threading.Event()

        def load():
            while not stop.is_set():
                try:
                    _import(server)
                except grpc.RpcError:
                    return
        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5 + random.random())
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        stop.set()
        for t in threads:
            t.join()
        for s in server._stubs.values():
            s.channel.close()
        server = start_server(state, env=FAST)
    # Intents left by the kills are chained at start or by the periodic sweep.
    assert _until(lambda: _ops_and_events(server)[1]["__intents__"] == [0])
    ops, events = _ops_and_events(server)
    assert ops, "the load made no operation"
    missing = [name for name in ops if "OK" not in events.get(name, [])]
    assert missing == []                          # every committed effect has its event
    claimed = {name for name, outcomes in events.items() if "OK" in outcomes}
    assert claimed - {"__intents__"} <= ops       # no event claims an effect that never was
    assert _verify(server).intact
    server.stop()


def test_an_outside_write_lock_fails_calls_closed_in_bounded_time_and_health_says_so(srv):
    lock = _db(srv)
    lock.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        assert _reason(lambda: srv.as_("security-officer-1").admin.ListKeys(
            pb.ListKeysRequest())) == "AUDIT_UNAVAILABLE"
        assert time.monotonic() - started < 10
        assert _until(lambda: _health(srv) == health_pb2.HealthCheckResponse.NOT_SERVING)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert _until(lambda: _health(srv) == health_pb2.HealthCheckResponse.SERVING)
    srv.as_("security-officer-1").admin.ListKeys(pb.ListKeysRequest())
    assert _verify(srv).intact


def test_a_call_that_failed_anyway_answers_only_audit_unavailable_when_its_event_is_lost(srv):
    """Fail closed means nothing but AUDIT_UNAVAILABLE, also for a call that failed anyway:
    a lookup made while the audit trail cannot be written must not say whether the key or
    the device exists, which no event would record. (Review, session 16: it said
    KEY_NOT_FOUND.)"""
    lock = _db(srv)
    lock.execute("BEGIN IMMEDIATE")
    try:
        assert _reason(lambda: srv.as_("security-officer-1").admin.GetKey(pb.GetKeyRequest(
            name="NO-SUCH-KEY-WHILE-LOCKED"))) == "AUDIT_UNAVAILABLE"
        assert _reason(lambda: srv.as_("s1sp").s1sp.VerifyPrepaymentKey(
            pb.VerifyPrepaymentKeyRequest(device_id="10-00-00-00-00-00-00-78",
                                          expected_kcv="000000"))) == "AUDIT_UNAVAILABLE"
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert _until(lambda: _health(srv) == health_pb2.HealthCheckResponse.SERVING)


def _cli(*args: str, server=None) -> subprocess.CompletedProcess:
    """`keysvc ARGS`, against `server` if given, wide enough that no line wraps."""
    where = ["--state-dir", str(server.state_dir), "--server", server.target] if server else []
    return subprocess.run([sys.executable, "-m", "keysvc.cli", *args, *where],
                          env=server_env({"COLUMNS": "400"}), cwd=ROOT, capture_output=True,
                          text=True)


def _with_trigger(server, sql: str):
    db = _db(server)
    db.execute(sql)
    return db


def test_a_trigger_dropping_intents_rolls_the_effect_back(srv):
    name = unique("AUD-HIDDEN")
    db = _with_trigger(srv, "CREATE TRIGGER hide_intent BEFORE INSERT ON audit_intents "
                            "BEGIN SELECT RAISE(IGNORE); END")
    try:
        assert _reason(lambda: _import(srv, name)) == "AUDIT_UNAVAILABLE"
    finally:
        db.execute("DROP TRIGGER hide_intent")
        db.close()
    ops, _ = _ops_and_events(srv)
    assert name not in ops


def test_a_trigger_dropping_chained_events_fails_the_call_closed_and_verify_names_it(srv):
    name = unique("AUD-SUPPRESSED")
    db = _with_trigger(srv, "CREATE TRIGGER hide_event BEFORE INSERT ON audit_events "
                            "WHEN NEW.action LIKE '%ImportTransportKey' "
                            "BEGIN SELECT RAISE(IGNORE); END")
    try:
        assert _reason(lambda: _import(srv, name)) == "AUDIT_UNAVAILABLE"
        v = _verify(srv)
        assert not v.intact and "could not be chained" in v.detail
    finally:
        db.execute("DROP TRIGGER hide_event")
        db.close()
    # The effect committed with its intent: chained once the trigger is gone.
    assert _until(lambda: "OK" in _ops_and_events(srv)[1].get(name, []))
    assert _until(lambda: _verify(srv).intact)


def test_an_officer_enrolment_whose_approval_rolls_back_is_taken_back(srv, tmp_path):
    from tests.support.clientcerts import issue
    name = unique("security-officer-m")
    mallory, _ = issue(srv, tmp_path, "m", cn=name)
    op = srv.as_("security-officer-1").admin.EnrollOfficer(pb.EnrollOfficerRequest(
        certificate_pem=(tmp_path / "pki" / "m.pem").read_text()))
    approve = pb.ApproveOperationRequest(operation_id=op.operation_id,
                                         request_digest=op.request_digest)
    db = _with_trigger(srv, "CREATE TRIGGER hide_intent2 BEFORE INSERT ON audit_intents "
                            "BEGIN SELECT RAISE(IGNORE); END")
    try:
        assert _reason(lambda: srv.as_("security-officer-2").admin.ApproveOperation(
            approve)) == "AUDIT_UNAVAILABLE"
    finally:
        db.execute("DROP TRIGGER hide_intent2")
        db.close()
    time.sleep(1.5)  # longer than a roster read is cached
    assert _reason(lambda: mallory.admin.ListKeys(pb.ListKeysRequest())) == \
        "OFFICER_NOT_ENROLLED"
    assert srv.as_("security-officer-2").admin.ApproveOperation(approve).state == \
        pb.Operation.APPROVED
    mallory.admin.ListKeys(pb.ListKeysRequest())
    mallory.channel.close()


def test_a_trigger_holding_the_head_back_fails_calls_closed(srv):
    db = _with_trigger(srv, "CREATE TRIGGER hold_head BEFORE UPDATE ON audit_head "
                            "BEGIN SELECT RAISE(IGNORE); END")
    try:
        assert _reason(lambda: srv.as_("auditor").audit.ListAuditEvents(
            pb.ListAuditEventsRequest())) == "AUDIT_UNAVAILABLE"
    finally:
        db.execute("DROP TRIGGER hold_head")
        db.close()
    assert _until(lambda: _reason(lambda: srv.as_("auditor").audit.ListAuditEvents(
        pb.ListAuditEventsRequest())) == "")


def test_an_erased_log_is_refused_and_found_after_a_restart(tmp_path):
    server = start_server(tmp_path / "erased", env=FAST)
    for _ in range(3):
        server.as_("security-officer-1").admin.ListKeys(pb.ListKeysRequest())
    server.stop()
    db = sqlite3.connect(tmp_path / "erased" / "keysvc.db", isolation_level=None)
    db.execute("DELETE FROM audit_events")
    db.execute("DELETE FROM audit_head")
    db.close()
    server = start_server(tmp_path / "erased", env=FAST)
    try:
        assert _reason(lambda: server.as_("security-officer-1").admin.ListKeys(
            pb.ListKeysRequest())) == "AUDIT_UNAVAILABLE"
        # Verifying is a call too, and fails closed; its refusal says why.
        with pytest.raises(grpc.RpcError) as info:
            _verify(server)
        assert "HSM anchor says 3" in info.value.details()
        # A change attempted meanwhile commits with its intent, and waits for the new chain.
        assert _reason(lambda: server.as_("security-officer-1").admin.CreateImportJob(
            pb.CreateImportJobRequest(name="while refused"))) == "AUDIT_UNAVAILABLE"
        time.sleep(4.5)  # older than twice the audit timeout: a sweep's to chain
    finally:
        server.stop()
    out = _cli("audit-new-chain", "--state-dir", str(tmp_path / "erased"), "--reason",
               "restored from backup")
    assert out.returncode == 0, out.stderr
    server = start_server(tmp_path / "erased", env=FAST)
    try:
        server.as_("security-officer-1").admin.ListKeys(pb.ListKeysRequest())
        events = server.as_("auditor").audit.ListAuditEvents(pb.ListAuditEventsRequest(
            action="audit.new_chain")).events
        assert events and "restored from backup" in events[0].target
        assert server.as_("auditor").audit.ListAuditEvents(pb.ListAuditEventsRequest(
            action="keysvc.v1.KeyAdministrationService/CreateImportJob")).events
    finally:
        server.stop()


# --------------------------------------------------------------------------- sinks
def test_every_event_is_in_the_audit_file_with_its_sequence_hash_and_mac(srv):
    for _ in range(3):
        srv.as_("security-officer-2").admin.ListKeys(pb.ListKeysRequest())
    exported = _export(srv)
    lines = {x["seq"]: x for x in _lines(_audit_file(srv)) if x.get("seq")}
    for c in exported:
        x = lines[c.event.sequence]
        assert (x["id"], x["hash"], x["mac"], x["prev_hash"]) == (c.event.id, c.hash, c.mac,
                                                                 c.prev_hash)


def test_verify_names_the_first_difference_between_the_chain_and_the_file(tmp_path):
    server = start_server(tmp_path / "diff", env=FAST)
    try:
        for _ in range(4):
            server.as_("security-officer-1").admin.ListKeys(pb.ListKeysRequest())
        path = _audit_file(server)
        lines = path.read_text().splitlines()
        victim = json.loads(lines[2])
        path.write_text("\n".join(lines[:2] + lines[3:]) + "\n")
        v = _verify(server)
        assert not v.intact
        assert f"event {victim['seq']}" in v.detail and "not in the sink" in v.detail
        out = _cli("audit", "verify", "--sink", str(path), server=server)
        assert out.returncode == 1 and "not in the sink" in out.stdout
    finally:
        server.stop()


def test_the_audit_file_rotates_by_size_and_still_verifies(tmp_path):
    server = start_server(tmp_path / "rotate", env={**FAST,
                                                     "KEYSVC_AUDIT_FILE_MAX_BYTES": "4096"})
    try:
        for _ in range(30):
            server.as_("security-officer-1").admin.ListKeys(pb.ListKeysRequest())
        path = _audit_file(server)
        assert path.with_name(path.name + ".1").exists()
        assert all(p.stat().st_size <= 4096 for p in path.parent.glob(path.name + "*"))
        assert _verify(server).intact
        out = _cli("audit", "verify", "--sink", str(path), server=server)
        assert out.returncode == 0, out.stdout
    finally:
        server.stop()


def test_an_audit_file_that_stops_fails_calls_closed_says_so_and_catches_up(tmp_path):
    port = free_port()
    server = start_server(tmp_path / "stuck", env={**FAST,
                                                    "KEYSVC_METRICS_LISTEN": f"127.0.0.1:{port}"})
    try:
        server.as_("security-officer-1").admin.ListKeys(pb.ListKeysRequest())
        path = _audit_file(server)
        path.rename(path.with_name("moved"))
        path.mkdir()  # the file can no longer be appended to
        assert _reason(lambda: server.as_("security-officer-1").admin.ListKeys(
            pb.ListKeysRequest())) == "AUDIT_UNAVAILABLE"
        assert _until(lambda: _health(server) == health_pb2.HealthCheckResponse.NOT_SERVING)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert "keysvc_audit_failures_total" in metrics
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz")
            raise AssertionError("/readyz said ready")
        except urllib.error.HTTPError as exc:
            assert exc.code == 503
        path.rmdir()
        path.with_name("moved").rename(path)
        assert _until(lambda: _health(server) == health_pb2.HealthCheckResponse.SERVING)
        server.as_("security-officer-1").admin.ListKeys(pb.ListKeysRequest())
        assert _verify(server).intact  # the events it missed were filled in
    finally:
        server.stop()


class _SyslogListener(threading.Thread):
    """A TLS syslog collector (RFC 5425 octet counting) with the dev CA's server cert."""

    def __init__(self, pki: Path) -> None:
        super().__init__(daemon=True)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.ctx, self.messages = ctx, []

    def run(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            threading.Thread(target=self._serve, args=(self.ctx.wrap_socket(
                conn, server_side=True),), daemon=True).start()

    def _serve(self, conn) -> None:
        buf = b""
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
            while b" " in buf:
                length, rest = buf.split(b" ", 1)
                if len(rest) < int(length):
                    break
                self.messages.append(rest[:int(length)].decode())
                buf = rest[int(length):]


def test_syslog_over_tls_receives_every_event_before_the_call_returns(tmp_path):
    state = tmp_path / "syslog"
    ensure_dev_pki(state / "pki")
    listener = _SyslogListener(state / "pki")
    listener.start()
    server = start_server(state, env={**FAST,
                                      "KEYSVC_AUDIT_SYSLOG": f"127.0.0.1:{listener.port}",
                                      "KEYSVC_AUDIT_SYSLOG_CA": str(state / "pki" / "ca.pem"),
                                      "KEYSVC_DEV": "on"})
    try:
        server.as_("security-officer-1").admin.ListKeys(pb.ListKeysRequest())
        # The server's send had returned before the call did: on loopback the bytes are then
        # in the listener's socket. Its thread may not have read them yet: wait for it only.
        deadline = time.monotonic() + 5

        def received() -> list[dict]:
            return [x for x in (json.loads(m.split(" audit - ", 1)[1])
                                for m in list(listener.messages))
                    if "seq" in x]  # not the "sink started at" marker
        while not received() and time.monotonic() < deadline:
            time.sleep(0.01)
        got = received()
        assert got and got[-1]["action"] == "keysvc.v1.KeyAdministrationService/ListKeys"
        assert all(m.startswith("<110>1 ") for m in listener.messages)
        assert all(x["seq"] and x["mac"] for x in got)
    finally:
        server.stop()


# --------------------------------------------------------------------------- export
def test_export_streams_the_chain_from_a_cursor_and_the_cli_writes_json_lines(srv):
    for _ in range(3):
        srv.as_("security-officer-1").admin.ListKeys(pb.ListKeysRequest())
    everything = _export(srv)
    cursor = everything[-3].event.sequence
    after = _export(srv, since=cursor, limit=0)
    assert [c.event.sequence for c in after][:2] == [cursor + 1, cursor + 2]
    out = _cli("audit", "export", "--since", str(cursor), "--format", "jsonl",
               server=srv).stdout
    lines = [json.loads(x) for x in out.splitlines()]
    assert lines[0]["seq"] == cursor + 1 and all(x["mac"] for x in lines)
    assert _reason(lambda: list(srv.as_("s1sp").audit.ExportAuditEvents(
        pb.ExportAuditEventsRequest()))) == "ROLE_NOT_PERMITTED"


def test_a_database_that_refuses_a_change_is_unavailable_not_internal(srv):
    db = _with_trigger(srv, "CREATE TRIGGER refuse_jobs BEFORE INSERT ON import_jobs "
                            "BEGIN SELECT RAISE(ABORT, 'no'); END")
    try:
        with pytest.raises(grpc.RpcError) as info:
            srv.as_("security-officer-1").admin.CreateImportJob(
                pb.CreateImportJobRequest(name="refused"))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_reason(info.value) == "DATABASE_UNAVAILABLE"
    finally:
        db.execute("DROP TRIGGER refuse_jobs")
        db.close()


def test_a_call_that_failed_unavailable_says_when_to_retry(srv):
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status
    lock = _db(srv)
    lock.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(grpc.RpcError) as info:
            srv.as_("auditor").audit.ListAuditEvents(pb.ListAuditEventsRequest())
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)
               for d in rpc_status.from_call(info.value).details)


def test_the_event_of_a_call_that_changed_nothing_names_its_target(srv):
    """The event of a call that changed nothing names what it was about (the servicer's
    target): a refused lookup of a device, of a key. (An independent review in session 15
    found a server change that dropped it, and no test that noticed.)"""
    device = "10-00-00-00-00-00-00-77"
    with pytest.raises(grpc.RpcError):
        srv.as_("s1sp").s1sp.VerifyPrepaymentKey(pb.VerifyPrepaymentKeyRequest(
            device_id=device, expected_kcv="000000"))
    with pytest.raises(grpc.RpcError):
        srv.as_("security-officer-1").admin.GetKey(pb.GetKeyRequest(name="NO-SUCH-KEY-XYZ"))
    def events(action: str) -> list:
        return list(srv.as_("auditor").audit.ListAuditEvents(pb.ListAuditEventsRequest(
            action=action, page_size=1000)).events)
    assert any(e.target == device and e.code == "DEVICE_KEY_NOT_FOUND"
               for e in events("keysvc.v1.S1SPService/VerifyPrepaymentKey"))
    assert any(e.target == "NO-SUCH-KEY-XYZ" and e.code == "KEY_NOT_FOUND"
               for e in events("keysvc.v1.KeyAdministrationService/GetKey"))
