"""Officers are enrolled keys; callers can be revoked (issue 13), through a real server
with certificates made for each case: enrolment and removal under dual control, the first
officers from the configuration, a deny list managed by quorum and client-CA CRLs, each
refusing a revoked certificate on its next call, also on a channel opened before."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from keysvc.api.v1 import keysvc_pb2 as pb
from keysvc.client import error_reason
from keysvc.identity.certificates import fingerprint
from tests.conftest import unique
from tests.serverproc import ROOT, server_env, start_server
from tests.support.clientcerts import crl, dev_ca, issue
from tests.support.encoder import kcv
from tests.support.waiting import until


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("officers"))
    yield s
    s.stop()


def _pem(path) -> bytes:
    return path.read_bytes()


def _cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _o(srv, n: int):
    return srv.as_(f"security-officer-{n}").admin


def _approve(admin, op):
    return admin.ApproveOperation(pb.ApproveOperationRequest(
        operation_id=op.operation_id, request_digest=op.request_digest))


def _refused(call) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return error_reason(info.value)


def _events(srv, action: str):
    return srv.as_("auditor").audit.ListAuditEvents(
        pb.ListAuditEventsRequest(page_size=1000, action=action)).events


def _deny(srv, key_fingerprint: str, reason: str = "key lost"):
    op = _o(srv, 1).DenyCertificate(pb.DenyCertificateRequest(fingerprint=key_fingerprint,
                                                              reason=reason))
    return _approve(_o(srv, 2), op)


def test_the_first_officers_come_from_the_configuration(srv):
    r = _o(srv, 1).ListOfficers(pb.ListOfficersRequest())
    pki = srv.state_dir / "pki"
    assert {(o.display_name, o.fingerprint) for o in r.officers} >= {
        (f"security-officer-{n}", fingerprint(_cert(pki / f"security-officer-{n}.pem")))
        for n in (1, 2)}
    assert r.quorum == 2


def test_an_officer_whose_key_is_not_enrolled_is_refused_and_audited(srv, tmp_path):
    stranger, _ = issue(srv, tmp_path, "stranger", cn=unique("security-officer-x"))
    assert _refused(lambda: stranger.admin.ListKeys(pb.ListKeysRequest())) == \
        "OFFICER_NOT_ENROLLED"
    assert any(e.code == "OFFICER_NOT_ENROLLED" and e.outcome == "DENIED"
               for e in _events(srv, "keysvc.v1.KeyAdministrationService/ListKeys"))
    stranger.channel.close()


def test_enrolling_an_officer_is_dual_control_and_shows_the_key(srv, tmp_path):
    name = unique("security-officer-e")
    new, _ = issue(srv, tmp_path, "new", cn=name)
    pem = _pem(tmp_path / "pki" / "new.pem")
    op = _o(srv, 1).EnrollOfficer(pb.EnrollOfficerRequest(certificate_pem=pem.decode(),
                                                          display_name="Erin Example"))
    assert op.kind == "ENROLL_OFFICER" and op.state == pb.Operation.PENDING
    assert op.request.fingerprint == fingerprint(_cert(tmp_path / "pki" / "new.pem"))
    assert op.request.officer_name == "Erin Example" and name in op.request.certificate_subject
    assert any("new officer" in w for w in op.request.warnings)
    assert _refused(lambda: new.admin.ListKeys(pb.ListKeysRequest())) == "OFFICER_NOT_ENROLLED"
    assert _approve(_o(srv, 2), op).state == pb.Operation.APPROVED
    new.admin.ListKeys(pb.ListKeysRequest())  # admitted on its next call
    # ... and known by its display name, whatever its CN says.
    assert new.admin.CreateImportJob(pb.CreateImportJobRequest(name=unique("job"))).import_job_id
    assert any(e.actor == "Erin Example" for e in
               _events(srv, "keysvc.v1.KeyAdministrationService/CreateImportJob"))
    new.channel.close()


def test_an_officer_cannot_be_enrolled_twice_or_from_another_ca_or_role(srv, tmp_path):
    issue(srv, tmp_path, "twice", cn=unique("security-officer-t"))
    pem = _pem(tmp_path / "pki" / "twice.pem")
    srv.enroll(pem)
    assert _refused(lambda: srv.enroll(pem)) == "OFFICER_EXISTS"
    issue(srv, tmp_path, "s1sp-like", cn=unique("s1sp"), roles=("s1sp",))
    assert _refused(lambda: srv.enroll(_pem(tmp_path / "pki" / "s1sp-like.pem"))) == \
        "CERTIFICATE_NOT_ACCEPTED"
    other_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert, _ = dev_ca(srv)
    forged = (x509.CertificateBuilder().subject_name(_cert(tmp_path / "pki" / "twice.pem")
                                                     .subject)
              .issuer_name(ca_cert.subject).public_key(other_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(ca_cert.not_valid_before_utc)
              .not_valid_after(ca_cert.not_valid_after_utc)
              .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
                  "urn:keysvc:role:security-officer")]), False)
              .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                             False)
              .sign(other_key, hashes.SHA256()))  # self-signed under the CA's name
    from cryptography.hazmat.primitives.serialization import Encoding
    assert _refused(lambda: srv.enroll(forged.public_bytes(Encoding.PEM))) == \
        "CERTIFICATE_NOT_ACCEPTED"


def test_removing_an_officer_is_dual_control_and_refuses_their_next_call(srv, tmp_path):
    name = unique("security-officer-r")
    gone, _ = issue(srv, tmp_path, "gone", cn=name, enroll=True)
    gone.admin.ListKeys(pb.ListKeysRequest())
    op = _o(srv, 1).RemoveOfficer(pb.RemoveOfficerRequest(display_name=name.upper()))
    assert op.kind == "REMOVE_OFFICER" and op.request.officer_name == name
    gone.admin.ListKeys(pb.ListKeysRequest())  # still enrolled while the removal waits
    _approve(_o(srv, 2), op)
    assert _refused(lambda: gone.admin.ListKeys(pb.ListKeysRequest())) == \
        "OFFICER_NOT_ENROLLED"
    gone.channel.close()


def test_removing_an_officer_below_the_quorum_is_refused(tmp_path):
    fresh = start_server(tmp_path / "fresh")
    try:
        assert _refused(lambda: _o(fresh, 1).RemoveOfficer(
            pb.RemoveOfficerRequest(display_name="security-officer-2"))) == \
            "OFFICERS_BELOW_QUORUM"
    finally:
        fresh.stop()


def _s1sp_call(caller) -> str:
    """One S1SP call: its refusal reason, or "" once admitted (the device is unknown)."""
    try:
        caller.s1sp.VerifyPrepaymentKey(pb.VerifyPrepaymentKeyRequest(
            device_id="00-00-00-00-00-00-00-01", expected_kcv="000000"))
    except grpc.RpcError as exc:
        reason = error_reason(exc)
        return "" if reason == "DEVICE_KEY_NOT_FOUND" else reason
    return ""


def test_a_denied_key_is_refused_on_its_next_call_also_on_an_open_channel(srv, tmp_path):
    caller, _ = issue(srv, tmp_path, "s1sp-x", cn=unique("s1sp-x"), roles=("s1sp",))
    assert _s1sp_call(caller) == ""  # admitted, and the channel stays open
    fp = fingerprint(_cert(tmp_path / "pki" / "s1sp-x.pem"))
    assert _deny(srv, fp).state == pb.Operation.APPROVED
    assert _s1sp_call(caller) == "CERTIFICATE_REVOKED"
    assert any(e.code == "CERTIFICATE_REVOKED" and e.outcome == "DENIED" for e in
               _events(srv, "keysvc.v1.S1SPService/VerifyPrepaymentKey"))
    listed = _o(srv, 1).ListOfficers(pb.ListOfficersRequest())
    assert any(d.fingerprint == fp and d.reason == "key lost" for d in listed.denied)
    # Allowed again: also dual control.
    op = _o(srv, 1).AllowCertificate(pb.AllowCertificateRequest(fingerprint=fp))
    assert _s1sp_call(caller) == "CERTIFICATE_REVOKED"
    _approve(_o(srv, 2), op)
    assert _s1sp_call(caller) == ""
    caller.channel.close()


def test_a_denied_officers_pending_approval_stops_counting(srv, tmp_path):
    officer, _ = issue(srv, tmp_path, "o", cn=unique("security-officer-p"), enroll=True)
    key, c1 = os.urandom(32), os.urandom(32)
    op = officer.admin.ImportTransportKey(pb.ImportTransportKeyRequest(
        name=unique("S1SP-TK"), purpose=pb.S1SP_TRANSPORT, owner_id="SMSO-LG-01",
        owner_type=pb.SMSO, expected_kcv=kcv(key), component=c1))
    _deny(srv, fingerprint(_cert(tmp_path / "pki" / "o.pem")), "left the company")
    c2 = bytes(a ^ b for a, b in zip(key, c1))
    after = _o(srv, 1).ApproveOperation(pb.ApproveOperationRequest(
        operation_id=op.operation_id, component=c2, request_digest=op.request_digest))
    assert after.state == pb.Operation.PENDING  # the denied officer's approval is void
    officer.channel.close()


def _revoked_by_crl(srv, tmp_path, filename: str):
    caller, _ = issue(srv, tmp_path, filename, cn=unique("s1sp-c"), roles=("s1sp",))
    assert _s1sp_call(caller) == ""
    return caller, _cert(tmp_path / "pki" / f"{filename}.pem").serial_number


def _sighup_until(srv, check, timeout: float = 10.0) -> bool:
    os.killpg(srv.proc.pid, signal.SIGHUP)
    return until(check, timeout)


def test_a_certificate_revoked_by_a_crl_is_refused_after_sighup_and_stays_revoked(
        srv, tmp_path):
    caller, serial = _revoked_by_crl(srv, tmp_path, "crl-victim")
    crls = srv.state_dir / "client-crls"
    crls.mkdir(exist_ok=True)
    (crls / "dev-ca.crl").write_bytes(crl(srv, [serial], number=1))
    assert _sighup_until(srv, lambda: _s1sp_call(caller) == "CERTIFICATE_REVOKED")
    assert any("newly revoked" in e.target for e in _events(srv, "client_crl.loaded"))
    (crls / "dev-ca.crl").unlink()  # the host's files are not trusted: nothing comes back
    os.killpg(srv.proc.pid, signal.SIGHUP)
    time.sleep(2)
    assert _s1sp_call(caller) == "CERTIFICATE_REVOKED"
    caller.channel.close()


def test_a_crl_not_signed_by_the_client_ca_is_refused_and_audited(srv, tmp_path):
    caller, serial = _revoked_by_crl(srv, tmp_path, "crl-other")
    ca_cert, _ = dev_ca(srv)
    impostor = ec.generate_private_key(ec.SECP256R1())
    crls = srv.state_dir / "client-crls"
    crls.mkdir(exist_ok=True)
    (crls / "forged.crl").write_bytes(crl(srv, [serial], signer=(ca_cert, impostor)))
    assert _sighup_until(srv, lambda: any("forged.crl" in e.target
                                          for e in _events(srv, "client_crl.refused")))
    assert _s1sp_call(caller) == ""
    (crls / "forged.crl").unlink()
    caller.channel.close()


def test_officers_are_enrolled_with_the_cli_and_its_confirmation(srv, tmp_path):
    issue(srv, tmp_path, "cli", cn=unique("security-officer-cli"))
    base = [sys.executable, "-m", "keysvc.cli", "admin"]
    common = ["--state-dir", str(srv.state_dir), "--server", srv.target]
    out = subprocess.run([*base, "enroll-officer", str(tmp_path / "pki" / "cli.pem"),
                          *common, "--as", "security-officer-1"], env=server_env(), cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    op_id = next(w for w in out.split() if w.startswith("op-"))
    shown = subprocess.run([*base, "approve", op_id, *common, "--as", "security-officer-2"],
                           input="y\n", env=server_env(), cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout
    assert "key fingerprint" in shown and "WARNING" in shown
    listed = subprocess.run([*base, "officers", *common, "--as", "security-officer-1"],
                            env=server_env(), cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    assert fingerprint(_cert(tmp_path / "pki" / "cli.pem"))[:16] in listed


# --------------------------------------------------------------------------- from review
def _crl_der(ca_cert, ca_key, serials, *, issuer=None, extensions=()):
    import datetime as dt

    from cryptography.hazmat.primitives import serialization
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)
    b = (x509.CertificateRevocationListBuilder().issuer_name(issuer or ca_cert.subject)
         .last_update(now).next_update(now + dt.timedelta(days=1)))
    for e in extensions:
        b = b.add_extension(e, False)
    for s in serials:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(s)
                                      .revocation_date(now).build())
    return b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_a_crl_naming_its_ca_in_another_string_encoding_still_revokes(srv, tmp_path):
    """RFC 5280 names are equal across string types; revocations are kept under the CA's
    key, not the bytes of its name."""
    from cryptography.x509.name import _ASN1Type
    caller, serial = _revoked_by_crl(srv, tmp_path, "enc")
    ca_cert, ca_key = dev_ca(srv)
    same_name = x509.Name([x509.NameAttribute(a.oid, a.value, _type=_ASN1Type.PrintableString)
                           for a in ca_cert.subject])
    assert same_name.public_bytes() != ca_cert.subject.public_bytes()
    crls = srv.state_dir / "client-crls"
    crls.mkdir(exist_ok=True)
    (crls / "printable.crl").write_bytes(_crl_der(ca_cert, ca_key, [serial], issuer=same_name,
                                                  extensions=[x509.CRLNumber(7)]))
    assert _sighup_until(srv, lambda: _s1sp_call(caller) == "CERTIFICATE_REVOKED")
    (crls / "printable.crl").unlink()
    caller.channel.close()


def test_a_malformed_crl_stops_no_other_crl_and_no_start(srv, tmp_path):
    from cryptography.x509.oid import ExtensionOID
    caller, serial = _revoked_by_crl(srv, tmp_path, "bad-crl")
    ca_cert, ca_key = dev_ca(srv)
    crls = srv.state_dir / "client-crls"
    crls.mkdir(exist_ok=True)
    (crls / "a-bad.crl").write_bytes(_crl_der(ca_cert, ca_key, [], extensions=[
        x509.UnrecognizedExtension(ExtensionOID.CRL_NUMBER, b"\x04\x00")]))
    (crls / "b-good.crl").write_bytes(crl(srv, [serial], number=50))
    assert _sighup_until(srv, lambda: _s1sp_call(caller) == "CERTIFICATE_REVOKED")
    assert any("a-bad.crl" in e.target for e in _events(srv, "client_crl.refused"))
    (crls / "a-bad.crl").unlink()
    (crls / "b-good.crl").unlink()
    caller.channel.close()


def test_enrolling_a_certificate_with_a_malformed_extension_is_refused(srv):
    import datetime as dt

    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtensionOID, NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.UnrecognizedExtension(
                ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x04\x00"), False)
            .sign(key, hashes.SHA256()))
    assert _refused(lambda: _o(srv, 1).EnrollOfficer(pb.EnrollOfficerRequest(
        certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode()))) == \
        "CERTIFICATE_NOT_ACCEPTED"


def test_an_officer_revoked_by_a_crl_no_longer_counts_towards_the_quorum(srv, tmp_path):
    officer, _ = issue(srv, tmp_path, "p", cn=unique("security-officer-q"), enroll=True)
    serial = _cert(tmp_path / "pki" / "p.pem").serial_number
    key, c1 = os.urandom(32), os.urandom(32)
    op = officer.admin.ImportTransportKey(pb.ImportTransportKeyRequest(
        name=unique("S1SP-TK"), purpose=pb.S1SP_TRANSPORT, owner_id="SMSO-LG-01",
        owner_type=pb.SMSO, expected_kcv=kcv(key), component=c1))
    crls = srv.state_dir / "client-crls"
    crls.mkdir(exist_ok=True)
    (crls / "revoke-p.crl").write_bytes(crl(srv, [serial], number=60))
    def refused() -> bool:
        try:
            officer.admin.ListKeys(pb.ListKeysRequest())
            return False
        except grpc.RpcError as exc:
            return error_reason(exc) == "CERTIFICATE_REVOKED"
    assert _sighup_until(srv, refused)
    c2 = bytes(a ^ b for a, b in zip(key, c1))
    after = _o(srv, 1).ApproveOperation(pb.ApproveOperationRequest(
        operation_id=op.operation_id, component=c2, request_digest=op.request_digest))
    assert after.state == pb.Operation.PENDING
    (crls / "revoke-p.crl").unlink()
    officer.channel.close()


def test_a_forged_pending_row_cannot_block_denying_a_key(srv):
    import datetime as dt
    import sqlite3
    fp = os.urandom(32).hex()
    db = sqlite3.connect(srv.state_dir / "keysvc.db")
    now = dt.datetime.now(dt.timezone.utc).isoformat(sep=" ")
    db.execute("INSERT INTO operations (id, kind, target, state, requested_by, approvals, "
               "payload, message, created_at, updated_at, partition, seal) VALUES "
               "(?,?,?,?,?,?,?,?,?,?,?,?)",
               ("op-forged" + os.urandom(4).hex(), "DENY_CERTIFICATE", fp, "PENDING",
                "nobody", "[]", "{}", "", now, now, "admin", b"x"))
    db.commit()
    db.close()
    assert _deny(srv, fp, "stolen").state == pb.Operation.APPROVED
    assert any("op-forged" in e.target for e in _events(srv, "record.seal_invalid"))


def test_a_reflection_stream_opened_before_a_denial_stops_at_its_next_request(srv, tmp_path):
    import queue

    from grpc_reflection.v1alpha import reflection_pb2
    caller, _ = issue(srv, tmp_path, "refl", cn=unique("s1sp-refl"), roles=("s1sp",))
    requests: queue.Queue = queue.Queue()
    stream = caller.channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)(
        iter(requests.get, None))
    requests.put(reflection_pb2.ServerReflectionRequest(list_services=""))
    assert next(stream).list_services_response.service
    _deny(srv, fingerprint(_cert(tmp_path / "pki" / "refl.pem")), "stolen")
    requests.put(reflection_pb2.ServerReflectionRequest(list_services=""))
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    requests.put(None)
    caller.channel.close()


def test_an_enrolment_left_pending_by_a_crash_never_counts_and_is_dropped(app):
    """The roster write of an enrolment happens before its approval commits; until that
    commit is confirmed the key is not an officer, and a pending change whose operation is
    not APPROVED (a crash, a rollback) is dropped."""
    import hashlib
    import time as _time
    from dataclasses import replace

    from keysvc.app import Caller
    from keysvc.identity.admission import admit
    from keysvc.identity.roster import Pending
    from keysvc.officers import settle_stale
    fp = hashlib.sha256(os.urandom(8)).hexdigest()
    app.roster.change(lambda st: replace(st, pending=(*st.pending, Pending(
        "op-never-committed", "ENROLL_OFFICER", fp, unique("Pending Officer"), _time.time()))))
    with pytest.raises(Exception) as info:
        admit(app, Caller("x", "security-officer", fp))
    assert getattr(info.value, "code", "") == "OFFICER_NOT_ENROLLED"
    assert settle_stale(app, older_than=0) >= 1
    assert app.roster.current().pending_for(fp) is None
    assert app.roster.current().officer(fp) is None


def test_an_approved_enrolment_whose_pending_entry_a_sweep_dropped_still_takes_effect(
        app, monkeypatch):
    """Another replica's sweep dropped the pending entry while the approval was still
    committing: the approving process settles from what it wrote, and the APPROVED
    operation takes effect."""
    from dataclasses import replace

    from cryptography import x509 as _x509
    from cryptography.hazmat.primitives import serialization

    from keysvc import keyadmin, officers
    from keysvc.pki import issue as issue_cert
    from tests.conftest import OFFICER_1, OFFICER_2
    pki = app.settings.state_dir / "pki"
    ca = _x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    cert, _ = issue_cert(ca, ca_key, unique("slow-officer"), role="security-officer")
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    op = officers.enroll_officer(app, OFFICER_1, pem)
    seen = []
    monkeypatch.setattr(keyadmin._TokenEffects, "_settle_roster",
                        lambda self, a: seen.extend(self.roster))
    assert keyadmin.approve(app, OFFICER_2, op.operation_id,
                            request_digest=op.request_digest).state == "APPROVED"
    (written,) = seen
    app.roster.change(lambda st: replace(st, pending=tuple(
        x for x in st.pending if x.op_id != written.op_id)))  # the other replica's sweep
    assert officers.settle(app, written.op_id, written) == "confirmed"
    assert app.roster.current().officer(written.fingerprint) is not None


def test_settling_asks_the_token_not_the_database_row(app, monkeypatch):
    """A database writer alters the operation's row after a quorum approved it: the token's
    anchor still says APPROVED, and the enrolment counts."""
    from cryptography import x509 as _x509
    from cryptography.hazmat.primitives import serialization
    from sqlalchemy import update

    from keysvc import keyadmin, officers
    from keysvc import store as st
    from keysvc.pki import issue as issue_cert
    from tests.conftest import OFFICER_1, OFFICER_2
    pki = app.settings.state_dir / "pki"
    ca = _x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    cert, _ = issue_cert(ca, ca_key, unique("token-officer"), role="security-officer")
    op = officers.enroll_officer(app, OFFICER_1, cert.public_bytes(
        serialization.Encoding.PEM).decode())
    seen = []
    monkeypatch.setattr(keyadmin._TokenEffects, "_settle_roster",
                        lambda self, a: seen.extend(self.roster))
    keyadmin.approve(app, OFFICER_2, op.operation_id, request_digest=op.request_digest)
    with app.store.tx() as conn:
        conn.execute(update(st.operations).where(st.operations.c.id == op.operation_id)
                     .values(state="PENDING"))
    (written,) = seen
    assert officers.settle(app, written.op_id) == "confirmed"
    assert app.roster.current().officer(written.fingerprint) is not None


def test_approving_again_after_a_failed_settle_is_not_refused(app):
    """An earlier try of the same approval left its pending entry: it gives way."""
    import hashlib
    import time as _time
    from dataclasses import replace
    from types import SimpleNamespace

    from keysvc import officers
    from keysvc.identity.roster import Pending
    fp = hashlib.sha256(os.urandom(8)).hexdigest()
    name = unique("Again Officer")
    app.roster.change(lambda st: replace(st, pending=(*st.pending, Pending(
        "op-again", "ENROLL_OFFICER", fp, name, _time.time()))))
    op = SimpleNamespace(id="op-again", kind="ENROLL_OFFICER", partition="admin")
    written: list = []
    assert officers.execute(app, None, op, {"fingerprint": fp, "name": name}, written)[0] \
        == "APPROVED"
    app.roster.change(lambda st: replace(st, pending=tuple(
        x for x in st.pending if x.op_id != "op-again")))


def test_list_officers_shows_changes_waiting_for_their_commit(app):
    import hashlib
    import time as _time
    from dataclasses import replace

    from keysvc.identity.roster import Pending
    from keysvc.servicers import KeyAdministrationServicer
    fp = hashlib.sha256(os.urandom(8)).hexdigest()
    app.roster.change(lambda st: replace(st, pending=(*st.pending, Pending(
        "op-shown", "ENROLL_OFFICER", fp, "Shown Officer", _time.time()))))
    try:
        r = KeyAdministrationServicer(app).ListOfficers(pb.ListOfficersRequest(), None)
        assert any(x.operation_id == "op-shown" and x.fingerprint == fp for x in r.pending)
        assert not any(o.fingerprint == fp for o in r.officers)
    finally:
        app.roster.change(lambda st: replace(st, pending=tuple(
            x for x in st.pending if x.op_id != "op-shown")))
