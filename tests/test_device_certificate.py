"""One test per rule of VerifyDeviceCertificate (api.md), plus real GB test certificates."""
from __future__ import annotations

import base64
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from keysvc.device_certificate import (
    CertificateParseError,
    CertificateVerdict,
    TrustStore,
    load_certificate,
    verify_device_certificate,
)
from tests.support.certs import (
    der,
    hardware_module_name,
    make_ca,
    make_crl,
    make_device_cert,
    make_key,
    pem,
)

CHF = "00-DB-12-34-56-78-90-01"
AT = datetime(2025, 6, 1, tzinfo=timezone.utc)
SHARED = Path(__file__).resolve().parents[2] / "shared"
NS = "urn:keysvc:smets1:migration:1.2"


def _dcc_test_certs() -> Path:
    folder = SHARED / "dcc-test-certs"
    if not folder.is_dir() and os.environ.get("KEYSVC_DCC_TEST_CERTS"):
        folder = Path(os.environ["KEYSVC_DCC_TEST_CERTS"])
    return folder


@pytest.fixture(scope="module")
def root():
    return make_ca("Test SMKI Root")


@pytest.fixture(scope="module")
def issuing(root):
    return make_ca("Test Device CA", parent=root)


@pytest.fixture(scope="module")
def trust(root):
    return TrustStore((root[0],))


def verify(cert: x509.Certificate, issuing, trust: TrustStore, chf: str | None = CHF,
           **kwargs) -> CertificateVerdict:
    kwargs.setdefault("intermediates", [der(issuing[0])])
    kwargs.setdefault("at", AT)
    return verify_device_certificate(der(cert), chf, trust, **kwargs)


def device(issuing, chf: str = CHF, **kwargs) -> x509.Certificate:
    return make_device_cert(issuing[1], issuing[0], chf, **kwargs)[0]


# --- valid certificates, DER and PEM -----------------------------------------------------

def test_gb_profile_der_certificate_is_valid_with_all_fields(issuing, trust):
    cert = device(issuing, serial=0x71C5)
    verdict = verify(cert, issuing, trust)
    assert verdict.valid and verdict.problems == () and verdict.problem_codes == ()
    assert verdict.subject == ""
    assert verdict.issuer == "CN=Test Device CA"
    assert verdict.serial_hex == "71C5"
    assert verdict.not_before == datetime(2016, 4, 6, tzinfo=timezone.utc)
    assert verdict.not_after is None
    assert verdict.device_id == CHF
    assert verdict.public_key_algorithm == "ECDSA P-256"


def test_pem_certificate_and_pem_intermediate_verify(issuing, trust):
    verdict = verify_device_certificate(pem(device(issuing)), CHF, trust,
                                        intermediates=[pem(issuing[0])], at=AT)
    assert verdict.valid, verdict.problems


def test_key_agreement_certificate_is_valid(issuing, trust):
    assert verify(device(issuing, key_usage="keyAgreement"), issuing, trust).valid


def test_serial_hex_is_whole_octets_upper_case(issuing, trust):
    assert verify(device(issuing, serial=0xABC), issuing, trust).serial_hex == "0ABC"


# --- CERT_PARSE --------------------------------------------------------------------------

@pytest.mark.parametrize("garbage", [b"", b"not a certificate", b"\x30\x82\x01\x00garbage",
                                     b"-----BEGIN CERTIFICATE-----\nAAAA\n"
                                     b"-----END CERTIFICATE-----\n"])
def test_garbage_is_cert_parse_and_nothing_else(garbage, trust):
    verdict = verify_device_certificate(garbage, CHF, trust, at=AT)
    assert not verdict.valid
    assert verdict.problem_codes == ("CERT_PARSE",)
    assert verdict.problems[0].field == "device_certificate"


def test_truncated_der_is_cert_parse(issuing, trust):
    verdict = verify_device_certificate(der(device(issuing))[:-10], CHF, trust, at=AT)
    assert verdict.problem_codes == ("CERT_PARSE",)


def test_load_certificate_error_never_echoes_the_bytes():
    secret = b"SECRET-KEY-MATERIAL-0123456789"
    with pytest.raises(CertificateParseError) as caught:
        load_certificate(secret)
    assert isinstance(caught.value, ValueError)
    assert "SECRET" not in str(caught.value) and "0123456789" not in str(caught.value)


def test_load_certificate_reads_der_and_pem(issuing):
    cert = device(issuing)
    assert load_certificate(der(cert)) == load_certificate(pem(cert)) == cert


def test_der_ending_in_a_whitespace_byte_still_parses(issuing, trust):
    for _ in range(5000):  # the last byte is signature data: about 1 in 40 is "whitespace"
        cert = device(issuing)
        if der(cert)[-1:] in (b" ", b"\t", b"\n", b"\r", b"\x0b", b"\x0c"):
            break
    else:
        pytest.fail("no certificate ending in a whitespace byte was made")
    assert verify(cert, issuing, trust).valid


def test_unparsable_intermediate_is_cert_parse(issuing, trust):
    verdict = verify(device(issuing), issuing, trust, intermediates=[b"junk", der(issuing[0])])
    assert verdict.problem_codes == ("CERT_PARSE",)
    assert verdict.device_id == CHF  # the device certificate itself was still read


# --- CERT_CHAIN and CERT_SIGNATURE -------------------------------------------------------

def test_unknown_issuer_is_cert_chain(issuing):
    other_root = make_ca("Other Root")
    verdict = verify(device(issuing), issuing, TrustStore((other_root[0],)))
    assert verdict.problem_codes == ("CERT_CHAIN",)


def test_missing_intermediate_is_cert_chain(issuing, trust):
    verdict = verify(device(issuing), issuing, trust, intermediates=())
    assert verdict.problem_codes == ("CERT_CHAIN",)


def test_empty_trust_store_is_cert_chain(issuing):
    assert verify(device(issuing), issuing, TrustStore(())).problem_codes == ("CERT_CHAIN",)


def test_certificate_issued_directly_by_anchor_verifies():
    anchor = make_ca("Direct Device CA")
    assert verify(device(anchor), anchor, TrustStore((anchor[0],)), intermediates=()).valid


def test_two_intermediates_in_any_order_verify(root, trust):
    middle = make_ca("Middle CA", parent=root)
    lower = make_ca("Lower CA", parent=middle)
    cert = device(lower)
    for order in ([der(lower[0]), der(middle[0])], [der(middle[0]), der(lower[0])]):
        assert verify(cert, lower, trust, intermediates=order).valid


def test_rsa_anchor_with_two_intermediates_verifies():
    rsa_root = make_ca("RSA Root", key=make_key("rsa2048"))
    middle = make_ca("RSA Middle", parent=rsa_root, key=make_key("rsa2048"))
    lower = make_ca("EC Lower", parent=middle)
    verdict = verify(device(lower), lower, TrustStore((rsa_root[0],)),
                     intermediates=[der(lower[0]), der(middle[0])])
    assert verdict.valid, verdict.problems


def test_flipped_signature_bit_is_cert_signature_not_cert_chain(issuing, trust):
    raw = bytearray(der(device(issuing)))
    raw[-1] ^= 0x01  # last byte of the ECDSA signature value
    verdict = verify_device_certificate(bytes(raw), CHF, trust,
                                        intermediates=[der(issuing[0])], at=AT)
    assert verdict.problem_codes == ("CERT_SIGNATURE",)


def test_intermediate_with_bad_signature_is_cert_signature(root, trust):
    impostor = make_ca("Impostor Device CA", parent=(root[0], make_key("p256")))
    verdict = verify(device(impostor), impostor, trust)
    assert verdict.problem_codes == ("CERT_SIGNATURE",)


def test_same_named_anchors_are_told_apart_by_key_identifier():
    old = make_ca("Rekeyed Root")
    new = make_ca("Rekeyed Root")
    current = make_ca("Device CA", parent=new)
    cert = device(current)
    assert verify(cert, current, TrustStore((old[0], new[0]))).valid
    # The old key's identifier differs, so it is no candidate at all: no path, not a bad signature.
    assert verify(cert, current, TrustStore((old[0],))).problem_codes == ("CERT_CHAIN",)


def test_non_ca_intermediate_is_no_path(root, trust):
    leaf_issuer = make_device_cert(root[1], root[0])  # a device key pretending to issue
    cert = make_device_cert(leaf_issuer[1], leaf_issuer[0])[0]
    verdict = verify_device_certificate(der(cert), CHF, trust,
                                        intermediates=[der(leaf_issuer[0])], at=AT)
    assert verdict.problem_codes == ("CERT_CHAIN",)


def test_a_path_search_checks_each_signature_once_whatever_the_intermediates(root, trust,
                                                                              monkeypatch):
    """Eight CA certificates that all name the anchor, without key identifiers: the search
    once tried every ordering of them (13 s of CPU for a 2.7 KB request, and every call of
    the process waited; review, session 18). Each signature is now checked once, and each
    certificate's extensions read once."""
    import keysvc.device_certificate as dc
    fakes = [make_ca("Test SMKI Root") for _ in range(8)]  # (the anchor's name, other keys)
    checks, looks, compares = [], [], []
    real, real_ext, real_eq = dc._signed_by, dc._ext, x509.Name.__eq__
    monkeypatch.setattr(dc, "_signed_by", lambda c, i: checks.append(1) or real(c, i))
    monkeypatch.setattr(dc, "_ext", lambda c, kind: looks.append(1) or real_ext(c, kind))
    monkeypatch.setattr(x509.Name, "__eq__", lambda a, b: compares.append(1) or real_eq(a, b))
    verdict = verify(device(fakes[0]), fakes[0], trust,
                     intermediates=[der(f[0]) for f in fakes])
    assert verdict.problem_codes == ("CERT_SIGNATURE",)
    assert len(checks) <= 9 * 9  # (a certificate and an issuer, each pair once)
    # Each pair of certificates is looked at once, not once a step: extensions and names
    # looked at again at each step cost up to a second a call (reviews 3 and 4).
    assert len(compares) <= 9 * 9 + 10
    assert len(looks) <= 2 * 9 * 9 + 2 * 9 + 10


def _intermediate(issuer, name: str = "Wide CA", attributes: int = 1, extensions: int = 0):
    """A CA certificate under `issuer` with a name of `attributes` attributes and
    `extensions` unrecognised extensions besides basicConstraints."""
    from cryptography.x509.oid import NameOID, ObjectIdentifier
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME,
                                                           f"{name} {i}")
                                        for i in range(attributes)]))
               .issuer_name(issuer[0].subject).public_key(make_key("p256").public_key())
               .serial_number(7).not_valid_before(issuer[0].not_valid_before_utc)
               .not_valid_after(issuer[0].not_valid_after_utc)
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True))
    for i in range(extensions):
        builder = builder.add_extension(x509.UnrecognizedExtension(
            ObjectIdentifier(f"1.3.6.1.4.1.99999.{i}"), b"\x05\x00"), critical=False)
    return builder.sign(issuer[1], hashes.SHA256())


def test_a_certificate_with_more_than_64_extensions_is_cert_parse(root, trust):
    """Far beyond the GB profiles; a thousand of them on each of eight intermediates cost
    a second of CPU a call (review 3, session 18)."""
    verdict = verify(device(root), root, trust,
                     intermediates=[der(_intermediate(root, extensions=64))])
    assert "CERT_PARSE" in verdict.problem_codes
    assert verify(device(root), root, trust,  # (63 and basicConstraints: taken)
                  intermediates=[der(_intermediate(root, extensions=63))]).valid


def test_a_name_of_more_than_32_attributes_is_cert_parse(root, trust):
    """Names of hundreds of attributes, compared again and again, cost a second a call
    (review 4, session 18); no GB certificate's name has more than a few."""
    verdict = verify(device(root), root, trust,
                     intermediates=[der(_intermediate(root, attributes=33))])
    assert "CERT_PARSE" in verdict.problem_codes
    assert verify(device(root), root, trust,
                  intermediates=[der(_intermediate(root, attributes=32))]).valid


# --- validity ----------------------------------------------------------------------------

def test_not_yet_valid_is_cert_not_yet_valid(issuing, trust):
    cert = device(issuing, not_before=AT + timedelta(days=1))
    assert verify(cert, issuing, trust).problem_codes == ("CERT_NOT_YET_VALID",)


def test_expired_is_cert_expired(issuing, trust):
    cert = device(issuing, not_after=AT - timedelta(seconds=1))
    verdict = verify(cert, issuing, trust)
    assert verdict.problem_codes == ("CERT_EXPIRED",)
    assert verdict.not_after == AT - timedelta(seconds=1)


def test_not_after_99991231235959Z_means_no_expiry(issuing, trust):
    cert = device(issuing)
    assert b"99991231235959Z" in der(cert)
    verdict = verify(cert, issuing, trust,
                     at=datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc))
    assert verdict.valid and verdict.not_after is None


def test_at_defaults_to_now_and_naive_at_is_utc(issuing, trust):
    cert = device(issuing, not_after=datetime(2030, 1, 1, tzinfo=timezone.utc))
    assert verify(cert, issuing, trust, at=None).valid
    assert verify(cert, issuing, trust, at=datetime(2031, 1, 1)).problem_codes == ("CERT_EXPIRED",)


# --- CERT_DEVICE_MISMATCH ----------------------------------------------------------------

def test_hw_serial_other_than_chf_is_cert_device_mismatch(issuing, trust):
    verdict = verify(device(issuing), issuing, trust, chf="00-DB-12-34-56-78-90-02")
    assert verdict.problem_codes == ("CERT_DEVICE_MISMATCH",)
    assert verdict.device_id == CHF


def test_chf_identifier_is_compared_normalised(issuing, trust):
    assert verify(device(issuing), issuing, trust, chf="00db123456789001").valid


def test_missing_hardware_module_name_is_cert_device_mismatch(issuing, trust):
    verdict = verify(device(issuing, san=False), issuing, trust)
    assert verdict.problem_codes == ("CERT_DEVICE_MISMATCH",) and verdict.device_id == ""


def test_none_chf_skips_comparison_but_still_requires_hardware_module_name(issuing, trust):
    assert verify(device(issuing), issuing, trust, chf=None).valid
    assert verify(device(issuing, san=False), issuing, trust,
                  chf=None).problem_codes == ("CERT_DEVICE_MISMATCH",)


def test_hw_serial_not_eight_bytes_is_cert_device_mismatch(issuing, trust):
    verdict = verify(device(issuing, hw_serial=b"\x00\xdb\x12"), issuing, trust)
    assert verdict.problem_codes == ("CERT_DEVICE_MISMATCH",) and verdict.device_id == ""


def test_malformed_chf_identifier_is_cert_device_mismatch(issuing, trust):
    assert verify(device(issuing), issuing, trust, chf="not-an-eui").problem_codes == (
        "CERT_DEVICE_MISMATCH",)


def test_two_hardware_module_names_are_cert_device_mismatch(issuing, trust):
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(issuing[0].subject)
            .public_key(make_key().public_key()).serial_number(1)
            .not_valid_before(AT - timedelta(days=1)).not_valid_after(AT + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                hardware_module_name(bytes.fromhex("00DB123456789001")),
                hardware_module_name(bytes.fromhex("00DB123456789002"))]), critical=True)
            .sign(issuing[1], hashes.SHA256()))
    assert "CERT_DEVICE_MISMATCH" in verify(cert, issuing, trust).problem_codes


# --- CERT_KEY_USAGE and CERT_IS_CA -------------------------------------------------------

def test_missing_key_usage_is_cert_key_usage(issuing, trust):
    verdict = verify(device(issuing, key_usage=None), issuing, trust)
    assert verdict.problem_codes == ("CERT_KEY_USAGE",)


def test_non_critical_key_usage_is_cert_key_usage(issuing, trust):
    cert = device(issuing, key_usage_critical=False)
    assert verify(cert, issuing, trust).problem_codes == ("CERT_KEY_USAGE",)


@pytest.mark.parametrize("usage", [("digitalSignature", "keyAgreement"), ("keyEncipherment",),
                                   ("digitalSignature", "nonRepudiation"), ()])
def test_key_usage_other_than_exactly_one_purpose_is_cert_key_usage(usage, issuing, trust):
    verdict = verify(device(issuing, key_usage=usage), issuing, trust)
    assert verdict.problem_codes == ("CERT_KEY_USAGE",)


def test_ca_flag_is_cert_is_ca(issuing, trust):
    assert verify(device(issuing, ca=True), issuing, trust).problem_codes == ("CERT_IS_CA",)
    assert verify(device(issuing, ca=False), issuing, trust).valid


def test_key_cert_sign_is_cert_is_ca(issuing, trust):
    cert = device(issuing, key_usage="keyCertSign")
    assert set(verify(cert, issuing, trust).problem_codes) == {"CERT_IS_CA", "CERT_KEY_USAGE"}


# --- CERT_KEY_ALGORITHM ------------------------------------------------------------------

@pytest.mark.parametrize("kind,name", [("p384", "ECDSA P-384"), ("rsa2048", "RSA 2048"),
                                       ("ed25519", "Ed25519")])
def test_key_other_than_p256_is_cert_key_algorithm(kind, name, issuing, trust):
    verdict = verify(device(issuing, key_type=kind), issuing, trust)
    assert verdict.problem_codes == ("CERT_KEY_ALGORITHM",)
    assert verdict.public_key_algorithm == name


# --- CERT_REVOKED ------------------------------------------------------------------------

def test_serial_on_issuers_crl_is_cert_revoked(root, issuing):
    cert = device(issuing, serial=4242)
    crl = make_crl(issuing[1], issuing[0], [17, 4242])
    verdict = verify(cert, issuing, TrustStore((root[0],), (crl,)))
    assert verdict.problem_codes == ("CERT_REVOKED",)


def test_crl_with_bad_signature_is_ignored(root, issuing):
    cert = device(issuing, serial=4242)
    forged = make_crl(make_key(), issuing[0], [4242])
    assert verify(cert, issuing, TrustStore((root[0],), (forged,))).valid


def test_crl_of_another_issuer_is_ignored(root, issuing):
    cert = device(issuing, serial=4242)
    other = make_crl(root[1], root[0], [4242])
    assert verify(cert, issuing, TrustStore((root[0],), (other,))).valid


# --- everything at once ------------------------------------------------------------------

def test_certificate_with_several_faults_reports_all_of_them(issuing):
    cert = device(issuing, key_usage=("digitalSignature", "keyCertSign"), ca=True, key_type="p384",
                  not_after=AT - timedelta(days=1), serial=99)
    crl = make_crl(issuing[1], issuing[0], [99])
    verdict = verify(cert, issuing, TrustStore((), (crl,)), chf="00-DB-12-34-56-78-90-FF")
    assert set(verdict.problem_codes) == {"CERT_CHAIN", "CERT_EXPIRED", "CERT_DEVICE_MISMATCH",
                                          "CERT_KEY_USAGE", "CERT_IS_CA", "CERT_KEY_ALGORITHM",
                                          "CERT_REVOKED"}
    assert not verdict.valid
    assert all(p.field == "device_certificate" for p in verdict.problems)


# --- TrustStore.from_dir -----------------------------------------------------------------

def test_trust_store_reads_pem_bundles_der_crt_and_crls(tmp_path, root, issuing):
    other = make_ca("Other Root")
    (tmp_path / "bundle.pem").write_bytes(pem(root[0]) + pem(other[0]))
    (tmp_path / "single.crt").write_bytes(der(issuing[0]))
    (tmp_path / "a.crl").write_bytes(pem(make_crl(root[1], root[0], [1])))
    (tmp_path / "b.crl").write_bytes(der(make_crl(issuing[1], issuing[0], [2])))
    (tmp_path / "README.txt").write_text("ignored")
    store = TrustStore.from_dir(tmp_path)
    assert set(store.anchors) == {root[0], other[0], issuing[0]}
    assert len(store.crls) == 2


def test_trust_store_from_missing_dir_is_empty(tmp_path):
    assert TrustStore.from_dir(tmp_path / "absent") == TrustStore(())


def test_trust_store_refuses_an_unreadable_anchor(tmp_path):
    (tmp_path / "broken.pem").write_bytes(
        b"-----BEGIN CERTIFICATE-----\nAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(CertificateParseError):
        TrustStore.from_dir(tmp_path)


# --- real GB certificates ----------------------------------------------------------------

@pytest.mark.parametrize("name,eui", [("00db123456789001-ds.pem", "00-DB-12-34-56-78-90-01"),
                                      ("00db123456789001-ka.pem", "00-DB-12-34-56-78-90-01"),
                                      ("00db1234567890a2-ds.pem", "00-DB-12-34-56-78-90-A2"),
                                      ("00db1234567890c8-ka.pem", "00-DB-12-34-56-78-90-C8")])
def test_dcc_test_device_certificates_fail_only_for_missing_chain(name, eui):
    path = _dcc_test_certs() / name
    if not path.is_file():
        pytest.skip(f"DCC test certificates not present ({path.parent})")
    verdict = verify_device_certificate(path.read_bytes(), eui, TrustStore(()))
    assert verdict.problem_codes == ("CERT_CHAIN",)
    assert verdict.device_id == eui
    assert verdict.public_key_algorithm == "ECDSA P-256"
    assert verdict.subject == "" and verdict.issuer == "CN=E357"
    assert verdict.not_after is None
    assert verdict.not_before == datetime(2016, 4, 6, tzinfo=timezone.utc)


def test_example_device_certificates_verify_against_example_device_ca():
    lxml_etree = pytest.importorskip("lxml.etree")
    folder = SHARED / "spec" / "examples" / "ea-kw"
    if not (folder / "plain.xml").is_file():
        pytest.skip(f"spec examples not present ({folder})")
    trust = TrustStore((load_certificate((folder / "device_ca.pem").read_bytes()),))
    root = lxml_etree.parse(str(folder / "plain.xml"), lxml_etree.XMLParser(resolve_entities=False))
    installations = root.findall(f"{{{NS}}}Installation")
    assert installations
    for installation in installations:
        chf = installation.findtext(f"{{{NS}}}CHFIdentifier")
        cert = base64.b64decode(installation.findtext(f"{{{NS}}}DeviceCertificate"))
        verdict = verify_device_certificate(cert, chf, trust)
        assert verdict.valid, (chf, verdict.problems)
        assert verdict.device_id == chf
