"""Officers who cannot be doubled, callers whose certificates say one thing (issue 13),
through a real server with certificates made for each case by its development CA: exactly
one role URI, a CN, not a CA, the clientAuth extended key usage; an officer is an enrolled
key, known by one display name."""
from __future__ import annotations

import datetime as dt
import os

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keysvc.api.v1 import keysvc_pb2 as pb
from keysvc.client import connect, error_reason
from keysvc.pki import ROLE_URI_PREFIX
from tests.conftest import unique
from tests.support.clientcerts import issue as _issue
from tests.support.encoder import kcv


@pytest.mark.parametrize("case", ["two-roles", "no-role", "no-cn", "ca", "no-eku"])
def test_a_certificate_that_is_not_one_client_with_one_role_is_refused_and_audited(
        server, tmp_path, case):
    kwargs = {"two-roles": dict(roles=("security-officer", "s1sp")), "no-role": dict(roles=()),
              "no-cn": dict(cn=None), "ca": dict(ca=True), "no-eku": dict(eku=())}[case]
    cn = unique("officer")
    stubs, _ = _issue(server, tmp_path, "odd", **{"cn": cn, **kwargs})
    with pytest.raises(grpc.RpcError) as info:
        stubs.admin.ListKeys(pb.ListKeysRequest())
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(info.value) == "CERTIFICATE_NOT_ACCEPTED"
    events = server.as_("auditor").audit.ListAuditEvents(
        pb.ListAuditEventsRequest(page_size=1000, action="keysvc.v1.KeyAdministrationService/"
                                                        "ListKeys")).events
    assert any(e.code == "CERTIFICATE_NOT_ACCEPTED" and e.outcome == "DENIED" for e in events)
    stubs.channel.close()


def _request(admin) -> tuple[pb.Operation, bytes]:
    key, c1 = os.urandom(32), os.urandom(32)
    op = admin.ImportTransportKey(pb.ImportTransportKeyRequest(
        name=unique("S1SP-TK"), purpose=pb.S1SP_TRANSPORT, owner_id="SMSO-LG-01",
        owner_type=pb.SMSO, expected_kcv=kcv(key), component=c1))
    return op, bytes(a ^ b for a, b in zip(key, c1))


def _second_approval_refused(first, second):
    """`first` requests an import, `second` approves it: the refusal."""
    op, c2 = _request(first.admin)
    with pytest.raises(grpc.RpcError) as info:
        second.admin.ApproveOperation(pb.ApproveOperationRequest(
            operation_id=op.operation_id, component=c2, request_digest=op.request_digest))
    return info


def test_one_key_in_two_certificates_is_one_officer(server, tmp_path):
    first, key = _issue(server, tmp_path, "one", cn=unique("security-officer-a"), enroll=True)
    second, _ = _issue(server, tmp_path, "two", cn=unique("security-officer-b"), key=key)
    info = _second_approval_refused(first, second)
    assert error_reason(info.value) == "SAME_OFFICER"


def _enrolment_refused(server, tmp_path, name: str, other: str) -> str:
    _issue(server, tmp_path, "one", cn=name, enroll=True)
    _issue(server, tmp_path, "two", cn=other)
    with pytest.raises(grpc.RpcError) as info:
        server.enroll((tmp_path / "pki" / "two.pem").read_bytes())
    return error_reason(info.value)


@pytest.mark.parametrize("spelling", [str.upper, "{} ".format])
def test_one_name_in_two_spellings_is_one_officer(server, tmp_path, spelling):
    name = unique("security-officer-c")
    assert _enrolment_refused(server, tmp_path, name, spelling(name)) == "OFFICER_EXISTS"


@pytest.mark.parametrize("spelling", [lambda n: n + "\u200b", lambda n: "\u200d" + n,
                                      lambda n: n.replace("o", "\u043e", 1),
                                      lambda n: n.replace("o", "\uff4f", 1),
                                      lambda n: n.replace("-", "  -", 1)])
def test_a_name_in_another_script_or_with_invisible_characters_is_refused_or_one_officer(
        server, tmp_path, spelling):
    name = unique("security-officer-d")
    assert _enrolment_refused(server, tmp_path, name, spelling(name)) in (
        "CERTIFICATE_NOT_ACCEPTED", "OFFICER_EXISTS")


def test_a_role_uri_in_another_case_counts_as_a_second_role(server, tmp_path):
    stubs, _ = _issue(server, tmp_path, "odd", cn=unique("officer"),
                      roles=("security-officer",))
    stubs.channel.close()
    pki = server.state_dir / "pki"
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "officer-x")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.UniformResourceIdentifier(ROLE_URI_PREFIX + "security-officer"),
                x509.UniformResourceIdentifier("URN:KEYSVC:ROLE:s1sp")]), False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .sign(ca_key, hashes.SHA256()))
    (tmp_path / "pki" / "case.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "pki" / "case.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    stubs = connect(server.target, tmp_path, "case")
    with pytest.raises(grpc.RpcError) as info:
        stubs.admin.ListKeys(pb.ListKeysRequest())
    assert error_reason(info.value) == "CERTIFICATE_NOT_ACCEPTED"
    stubs.channel.close()


@pytest.mark.parametrize("kwargs", [dict(roles=()), dict(ca=True), dict(eku=())])
def test_reflection_needs_an_accepted_certificate_with_a_role(server, tmp_path, kwargs):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    stubs, _ = _issue(server, tmp_path, "odd", **{"cn": unique("tool"), **kwargs})
    reflect = reflection_pb2_grpc.ServerReflectionStub(stubs.channel)
    with pytest.raises(grpc.RpcError) as info:
        list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")])))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    stubs.channel.close()


@pytest.mark.parametrize("raw", [b"\xff\xff\xff\xff", b"\x0a\x02\xff\xfe"],
                         ids=["not-protobuf", "not-utf-8"])
def test_an_undecodable_request_is_invalid_request_after_the_role_check_and_audited(
        server, raw):
    def call(identity: str):
        return server.as_(identity).channel.unary_unary(
            "/keysvc.v1.KeyAdministrationService/GetKey")(raw)
    with pytest.raises(grpc.RpcError) as info:
        call("s1sp")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as info:
        call("security-officer-1")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(info.value) == "INVALID_REQUEST"
    events = server.as_("auditor").audit.ListAuditEvents(pb.ListAuditEventsRequest(
        page_size=1000, action="keysvc.v1.KeyAdministrationService/GetKey")).events
    assert any(e.code == "INVALID_REQUEST" and e.actor == "security-officer-1" for e in events)
