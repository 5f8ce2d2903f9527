"""Rollback certificate escrow through the real server: roles, races, seal, CLI, and one run
under libfaketime at 23:30 UTC on 30 June 2026 (00:30 on 1 July in London).

The session server is shared with other test files, so every test uses fresh random CHF
identifiers and windows around today's London date.
"""
from __future__ import annotations

import re
import secrets
import sqlite3
import subprocess
import threading
from datetime import date, datetime, timedelta, timezone

import grpc
import pytest

from keysvc.api.v1 import keysvc_pb2 as pb
from keysvc.client import connect, error_reason
from keysvc.escrow import london_today
from tests.serverproc import ROOT, server_env, start_server
from tests.support.certs import der, make_ca, make_device_cert, pem

CA_CERT, CA_KEY = make_ca("Test SMSO rollback CA (e2e)")
KEYSVC = str(ROOT / ".venv" / "bin" / "keysvc")
OFFICER, OFFICER_2, S1SP = "security-officer-1", "security-officer-2", "s1sp"


# --------------------------------------------------------------------------- helpers
def new_chf() -> str:
    return "00-DB-" + "-".join(f"{b:02X}" for b in secrets.token_bytes(6))


def cert(chf: str = "00-DB-12-34-56-78-90-01"):
    return make_device_cert(CA_KEY, CA_CERT, chf)[0]


def pb_date(d: date) -> pb.Date:
    return pb.Date(year=d.year, month=d.month, day=d.day)


def today() -> date:
    return london_today(datetime.now(timezone.utc))


def open_window() -> tuple[date, date]:
    """A window that holds today's London date even if the test runs across midnight."""
    t = today()
    return t - timedelta(days=1), t + timedelta(days=1)


def deposit_request(chfs: list[str], *, valid_from: date | None = None,
                    valid_to: date | None = None, certificates: list[bytes] | None = None,
                    max_releases: int = 0, smso_id: str = "SMSO-E2E"):
    if valid_from is None and valid_to is None:
        valid_from, valid_to = open_window()
    return pb.EscrowRollbackCertificatesRequest(
        smso_id=smso_id, group_id="EA", chf_identifiers=chfs,
        certificates=certificates or [der(cert())],
        valid_from=pb_date(valid_from) if valid_from else None,
        valid_to=pb_date(valid_to) if valid_to else None,
        constraints=pb.EscrowConstraints(max_releases=max_releases, note="e2e"))


def deposit(srv, chf: str, **kwargs) -> str:
    return srv.as_(OFFICER).admin.EscrowRollbackCertificates(
        deposit_request([chf], **kwargs)).escrow_id


def release_request(chf: str, reason: str = "FOC migration rolled back"):
    return pb.ReleaseRollbackCertificatesRequest(chf_identifier=chf, reason=reason)


def failure(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call(request)
    return e.value.code(), error_reason(e.value)


def listed(srv, chf: str) -> pb.Escrow:
    (e,) = srv.as_(OFFICER).admin.ListEscrows(pb.ListEscrowsRequest(chf_identifier=chf)).escrows
    return e


# --------------------------------------------------------------------------- roles
@pytest.mark.parametrize("identity", [OFFICER, "dco", "auditor"])
def test_only_s1sp_releases_rollback_certificates(server, identity):
    chf = new_chf()
    deposit(server, chf)
    assert failure(server.as_(identity).s1sp.ReleaseRollbackCertificates,
                   release_request(chf)) == (grpc.StatusCode.PERMISSION_DENIED,
                                             "ROLE_NOT_PERMITTED")
    assert listed(server, chf).releases == 0
    r = server.as_(S1SP).s1sp.ReleaseRollbackCertificates(release_request(chf))
    assert r.certificates and listed(server, chf).releases == 1
    assert listed(server, chf).seal_intact  # checked against its HSM seal as it is listed


@pytest.mark.parametrize("identity", [S1SP, "dco", "auditor"])
def test_only_security_officers_deposit_list_and_revoke(server, identity):
    chf = new_chf()
    eid = deposit(server, chf)
    admin = server.as_(identity).admin
    denied = (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_PERMITTED")
    assert failure(admin.EscrowRollbackCertificates, deposit_request([new_chf()])) == denied
    assert failure(admin.ListEscrows, pb.ListEscrowsRequest(chf_identifier=chf)) == denied
    assert failure(admin.RevokeEscrow, pb.RevokeEscrowRequest(escrow_id=eid)) == denied
    assert not listed(server, chf).revoked
    # every security officer may: the second one revokes
    e = server.as_(OFFICER_2).admin.RevokeEscrow(pb.RevokeEscrowRequest(escrow_id=eid))
    assert e.revoked


def test_a_denied_escrow_call_is_audited(server):
    def denied_events() -> list:
        return [e for e in server.as_("auditor").audit.ListAuditEvents(
            pb.ListAuditEventsRequest(
                actor=OFFICER, action="keysvc.v1.S1SPService/ReleaseRollbackCertificates",
                page_size=1000)).events
            if e.outcome == "DENIED" and e.code == "ROLE_NOT_PERMITTED"]
    before = len(denied_events())
    failure(server.as_(OFFICER).s1sp.ReleaseRollbackCertificates, release_request(new_chf()))
    assert len(denied_events()) == before + 1


# --------------------------------------------------------------------------- deposit
def test_deposit_validation_through_the_server(server):
    admin = server.as_(OFFICER).admin
    bad = grpc.StatusCode.INVALID_ARGUMENT
    t = today()
    assert failure(admin.EscrowRollbackCertificates, deposit_request(
        [new_chf()], valid_from=t, valid_to=t - timedelta(days=1))) == (bad, "INVALID_DATE_RANGE")
    assert failure(admin.EscrowRollbackCertificates, deposit_request(
        [new_chf()], valid_from=t, valid_to=None)) == (bad, "INVALID_DATE_RANGE")
    assert failure(admin.EscrowRollbackCertificates, deposit_request(
        [new_chf()], certificates=[b"garbage"])) == (bad, "INVALID_CERTIFICATE")
    expiring = make_device_cert(CA_KEY, CA_CERT, not_after=datetime(
        t.year, t.month, t.day, 12, tzinfo=timezone.utc))[0]
    assert failure(admin.EscrowRollbackCertificates, deposit_request(
        [new_chf()], certificates=[der(expiring)])) == (bad, "INVALID_CERTIFICATE")
    chf = new_chf()
    assert failure(admin.EscrowRollbackCertificates, deposit_request(
        [chf, "00-DB-XX"])) == (bad, "INVALID_EUI64")
    assert not admin.ListEscrows(pb.ListEscrowsRequest(chf_identifier=chf)).escrows


def test_pem_and_der_are_both_accepted_and_released_as_der(server):
    a, b, chf = cert(), cert(), new_chf()
    deposit(server, chf, certificates=[pem(a), der(b)])
    assert listed(server, chf).certificate_count == 2
    r = server.as_(S1SP).s1sp.ReleaseRollbackCertificates(release_request(chf))
    assert list(r.certificates) == [der(a), der(b)]


# --------------------------------------------------------------------------- constraints
def test_max_releases_enforced_and_releases_left_reported_through_the_server(server):
    chf = new_chf()
    valid_from, valid_to = open_window()
    eid = deposit(server, chf, max_releases=2)
    s1sp = server.as_(S1SP).s1sp
    r = s1sp.ReleaseRollbackCertificates(release_request(chf))
    assert (r.escrow_id, r.releases_left) == (eid, 1)
    assert (r.valid_from, r.valid_to) == (pb_date(valid_from), pb_date(valid_to))
    assert s1sp.ReleaseRollbackCertificates(release_request(chf)).releases_left == 0
    assert failure(s1sp.ReleaseRollbackCertificates, release_request(chf)) == (
        grpc.StatusCode.FAILED_PRECONDITION, "ESCROW_EXHAUSTED")
    assert listed(server, chf).releases == 2
    unlimited = new_chf()
    deposit(server, unlimited)
    assert s1sp.ReleaseRollbackCertificates(release_request(unlimited)).releases_left == -1


def test_two_concurrent_releases_of_the_last_remaining_one_through_the_server(server):
    """Two s1sp channels race for the last release: exactly one gets it."""
    stubs = [connect(server.target, server.state_dir, S1SP) for _ in range(2)]
    try:
        for round_ in range(3):
            chf = new_chf()
            deposit(server, chf, max_releases=2)
            stubs[0].s1sp.ReleaseRollbackCertificates(release_request(chf))  # one left
            barrier = threading.Barrier(2)
            results: list = []

            def go(stub) -> None:
                barrier.wait()
                try:
                    results.append(stub.s1sp.ReleaseRollbackCertificates(
                        release_request(chf, f"race {round_}")).releases_left)
                except grpc.RpcError as e:
                    results.append(error_reason(e))

            threads = [threading.Thread(target=go, args=(s,)) for s in stubs]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert sorted(results, key=str) == [0, "ESCROW_EXHAUSTED"], results
            assert listed(server, chf).releases == 2
    finally:
        for s in stubs:
            s.channel.close()


def test_revoked_escrow_releases_nothing_through_the_server(server):
    chf = new_chf()
    eid = deposit(server, chf)
    e = server.as_(OFFICER).admin.RevokeEscrow(pb.RevokeEscrowRequest(escrow_id=eid,
                                                                       reason="superseded"))
    assert e.revoked and e.escrow_id == eid
    assert failure(server.as_(S1SP).s1sp.ReleaseRollbackCertificates,
                   release_request(chf)) == (grpc.StatusCode.NOT_FOUND, "ESCROW_NOT_FOUND")
    assert listed(server, chf).releases == 0


def test_every_release_through_the_server_is_recorded_with_actor_reason_and_time(server):
    chf = new_chf()
    eid = deposit(server, chf)
    before = datetime.now(timezone.utc) - timedelta(seconds=5)
    server.as_(S1SP).s1sp.ReleaseRollbackCertificates(release_request(chf, "ticket 4711"))
    after = datetime.now(timezone.utc) + timedelta(seconds=5)
    with sqlite3.connect(server.state_dir / "keysvc.db", timeout=30) as db:
        recorded = db.execute("SELECT actor, reason, time FROM escrow_releases "
                              "WHERE escrow_id=?", (eid,)).fetchall()
    assert [(a, r) for a, r, _ in recorded] == [("s1sp", "ticket 4711")]
    when = datetime.fromisoformat(recorded[0][2]).replace(tzinfo=timezone.utc)
    assert before <= when <= after


# --------------------------------------------------------------------------- seal
def test_a_record_edited_in_the_servers_database_is_refused_and_audited(server):
    chf = new_chf()
    eid = deposit(server, chf, max_releases=1)
    with sqlite3.connect(server.state_dir / "keysvc.db", timeout=30) as db:
        assert db.execute("UPDATE escrows SET max_releases=0, valid_to='2099-12-31' "
                          "WHERE id=?", (eid,)).rowcount == 1
    assert failure(server.as_(S1SP).s1sp.ReleaseRollbackCertificates,
                   release_request(chf)) == (grpc.StatusCode.FAILED_PRECONDITION,
                                             "ESCROW_SEAL_INVALID")
    events = server.as_("auditor").audit.ListAuditEvents(pb.ListAuditEventsRequest(
        actor=S1SP, page_size=1000)).events
    seal = [e for e in events if e.code == "ESCROW_SEAL_INVALID" and e.target == eid]
    assert seal, "the refusal must be an audit event naming the escrow"
    assert server.as_("auditor").audit.VerifyAuditLog(pb.VerifyAuditLogRequest()).intact


# --------------------------------------------------------------------------- CLI
def keysvc(server, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([KEYSVC, *args, "--state-dir", str(server.state_dir),
                        "--server", server.target], env=server_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def test_cli_deposit_list_release_and_revoke(server, tmp_path):
    a, b, chf = cert(), cert(), new_chf()
    (tmp_path / "a.pem").write_bytes(pem(a))
    (tmp_path / "b.der").write_bytes(der(b))
    valid_from, valid_to = open_window()
    out = keysvc(server, "admin", "escrow", "deposit", "--smso-id", "SMSO-CLI",
                 "--chf", chf.lower(), "--certificate", str(tmp_path / "a.pem"),
                 "--certificate", str(tmp_path / "b.der"), "--valid-from",
                 valid_from.isoformat(), "--valid-to", valid_to.isoformat(),
                 "--max-releases", "3", "--note", "cli test").stdout
    eid = re.search(r"escrow_id: (esc-[0-9a-f]+)", out).group(1)

    listing = keysvc(server, "admin", "escrow", "list", "--chf", chf).stdout
    assert eid in listing and "SMSO-CLI" in listing and valid_to.isoformat() in listing

    released = tmp_path / "released"
    out = keysvc(server, "s1sp", "release-rollback", chf, "--reason", "rolled back (CLI)",
                 "--out", str(released)).stdout
    assert eid in out
    assert sorted(p.read_bytes() for p in released.iterdir()) == sorted([der(a), der(b)])
    assert listed(server, chf).releases == 1

    out = keysvc(server, "admin", "escrow", "revoke", eid, "--reason", "superseded").stdout
    assert eid in out and "yes" in out
    p = keysvc(server, "s1sp", "release-rollback", chf, "--reason", "again", ok=False)
    assert p.returncode == 1 and "ESCROW_NOT_FOUND" in p.stderr


def test_cli_refusals_name_the_reason(server, tmp_path):
    (tmp_path / "c.der").write_bytes(der(cert()))
    t = today()
    p = keysvc(server, "admin", "escrow", "deposit", "--smso-id", "SMSO-CLI", "--chf",
               new_chf(), "--certificate", str(tmp_path / "c.der"), "--valid-from",
               t.isoformat(), "--valid-to", (t - timedelta(days=1)).isoformat(), ok=False)
    assert p.returncode == 1 and "INVALID_DATE_RANGE" in p.stderr
    p = keysvc(server, "admin", "escrow", "list", "--as", S1SP, ok=False)
    assert p.returncode == 1 and "PERMISSION_DENIED" in p.stderr
    p = keysvc(server, "s1sp", "release-rollback", new_chf(), "--reason", "x",
               "--as", OFFICER, ok=False)
    assert p.returncode == 1 and "PERMISSION_DENIED" in p.stderr


# --------------------------------------------------------------------------- faketime
FAKE_NOW = "2026-06-30 23:30:00"  # UTC; 00:30 BST on 1 July 2026


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory):
    """A server of its own (own state, tokens, PKI made at the fake time) under libfaketime.
    The fake clock starts at FAKE_NOW and advances."""
    srv = start_server(tmp_path_factory.mktemp("faketime-server"), env={"TZ": "UTC"},
                       argv_prefix=["faketime", FAKE_NOW])
    yield srv
    srv.stop()


def test_server_under_faketime_at_2330_utc_on_30_june_uses_the_london_date(fake_server):
    ending, starting = new_chf(), new_chf()
    deposit(fake_server, ending, valid_from=date(2026, 6, 1), valid_to=date(2026, 6, 30))
    eid = deposit(fake_server, starting, valid_from=date(2026, 7, 1),
                  valid_to=date(2026, 7, 31))
    # the server's clock really is the fake one
    deposited = listed(fake_server, starting).deposited_at.ToDatetime(tzinfo=timezone.utc)
    assert datetime(2026, 6, 30, 23, 30, tzinfo=timezone.utc) <= deposited < datetime(
        2026, 6, 30, 23, 45, tzinfo=timezone.utc)

    s1sp = fake_server.as_(S1SP).s1sp
    assert failure(s1sp.ReleaseRollbackCertificates, release_request(ending)) == (
        grpc.StatusCode.FAILED_PRECONDITION, "ESCROW_WINDOW_CLOSED")
    r = s1sp.ReleaseRollbackCertificates(release_request(starting))
    assert r.escrow_id == eid and r.valid_from == pb_date(date(2026, 7, 1))
    assert len(r.certificates) == 1
