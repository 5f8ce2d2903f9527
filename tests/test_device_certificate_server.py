"""VerifyDeviceCertificate through the server and the CLI, on certificates keysvc did not make."""
from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from keysvc.api.v1 import keysvc_pb2 as pb
from tests.conftest import EXAMPLES, SHARED
from tests.serverproc import ROOT, server_env
from tests.support import certs

DCC = SHARED / "dcc-test-certs"


def test_a_certificate_that_does_not_parse_is_a_cert_parse_verdict_not_an_error(server):
    v = server.as_("s1sp").s1sp.VerifyDeviceCertificate(pb.VerifyDeviceCertificateRequest(
        certificate=b"not a certificate", chf_identifier="00-DB-12-34-56-78-90-01"))
    assert not v.valid and [p.code for p in v.problems] == ["CERT_PARSE"]


@pytest.mark.skipif(not DCC.is_dir(), reason="shared/dcc-test-certs is absent")
def test_real_gb_device_certificate_reports_only_cert_chain_through_the_server(server):
    v = server.as_("s1sp").s1sp.VerifyDeviceCertificate(pb.VerifyDeviceCertificateRequest(
        certificate=(DCC / "00db123456789001-ds.pem").read_bytes(),
        chf_identifier="00DB123456789001"))
    assert [p.code for p in v.problems] == ["CERT_CHAIN"]
    assert v.device_id == "00-DB-12-34-56-78-90-01"
    assert v.public_key_algorithm == "ECDSA P-256"
    assert not v.HasField("not_after")          # 99991231235959Z: no expiry
    assert v.issuer == "CN=E357"


def test_example_device_certificate_chains_to_the_servers_trust_anchor(server):
    from lxml import etree
    root = etree.parse(str(EXAMPLES / "ea-kw" / "plain.xml")).getroot()
    ns = {"m": "urn:keysvc:smets1:migration:1.2"}
    inst = root.find("m:Installation", ns)
    import base64
    der = base64.b64decode(inst.findtext("m:DeviceCertificate", namespaces=ns))
    v = server.as_("s1sp").s1sp.VerifyDeviceCertificate(pb.VerifyDeviceCertificateRequest(
        certificate=der, chf_identifier=inst.findtext("m:CHFIdentifier", namespaces=ns)))
    assert v.valid, v.problems


def test_at_moves_the_validity_check(server):
    ca, ca_key = certs.make_ca("Not in the server's trust store")
    cert, _ = certs.make_device_cert(ca_key, ca, not_after=dt.datetime(2030, 1, 1,
                                                                      tzinfo=dt.timezone.utc))
    at = Timestamp()
    at.FromDatetime(dt.datetime(2031, 1, 1))
    v = server.as_("s1sp").s1sp.VerifyDeviceCertificate(pb.VerifyDeviceCertificateRequest(
        certificate=certs.pem(cert), chf_identifier="00-DB-12-34-56-78-90-01",
        intermediates=[certs.der(ca)], at=at))
    assert sorted(p.code for p in v.problems) == ["CERT_CHAIN", "CERT_EXPIRED"]


@pytest.mark.skipif(not DCC.is_dir(), reason="shared/dcc-test-certs is absent")
def test_cli_verify_cert_prints_the_verdict_as_a_table(server):
    out = subprocess.run(
        [sys.executable, "-m", "keysvc.cli", "s1sp", "verify-cert",
         str(DCC / "00db1234567890c8-ka.pem"), "--chf", "00-DB-12-34-56-78-90-C8",
         "--state-dir", str(server.state_dir), "--server", server.target],
        capture_output=True, text=True, cwd=ROOT, env=server_env())
    assert out.returncode == 1, out.stderr          # not valid: no anchor for CN=E357
    assert "CERT_CHAIN" in out.stdout and "00-DB-12-34-56-78-90-C8" in out.stdout
    assert "ECDSA P-256" in out.stdout and "no expiry" in out.stdout


def test_a_certificate_checked_without_a_chf_identifier_is_not_valid(server):
    """chf_identifier is not optional (api.md): no CHF binding, no valid verdict; the
    certificate's own device id is still reported."""
    issuing, key = certs.make_ca("Device CA without CHF")
    cert, _ = certs.make_device_cert(key, issuing, "00-DB-12-34-56-78-90-01")
    v = server.as_("s1sp").s1sp.VerifyDeviceCertificate(pb.VerifyDeviceCertificateRequest(
        certificate=certs.der(cert)))
    assert not v.valid and "CERT_DEVICE_MISMATCH" in [p.code for p in v.problems]
    assert v.device_id == "00-DB-12-34-56-78-90-01"
