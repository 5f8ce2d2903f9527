"""Verification of SMETS1 CHF device certificates (api.md, VerifyDeviceCertificate).

A device certificate in the GB SMKI device profile has an empty subject, a critical
certificatePolicies extension and names its device only through an RFC 4108
hardwareModuleName in the subjectAltName. Generic RFC 5280 validators (including
cryptography's `x509.verification.PolicyBuilder`) reject such certificates outright, and a
bare rejection cannot tell the caller *which* of the profile's rules failed. So the path is
built here by name (and key identifier) and every signature on it is checked with pyca/
cryptography's `verify_directly_issued_by`; no signature mathematics is done here.

Every check runs and every problem is reported: the S1SP needs the full list to tell an SMSO
what to fix, and a verdict must never be an exception for a bad input.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence, TypeVar

from asn1crypto import core
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from keysvc.domain import InvalidEUI64, Problem, eui64_from_bytes, normalise_eui64

FIELD = "device_certificate"
HARDWARE_MODULE_NAME = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.4")
# GeneralizedTime 99991231235959Z: RFC 5280 4.1.2.5's "no well-defined expiration date".
NO_EXPIRY = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)
_MAX_PATH = 8  # far beyond SMKI's root -> issuing CA -> device; only stops pathological input
# Far beyond any certificate of the GB profiles (a device's has about eight extensions and
# a name of one or two attributes); a thousand extensions or names of hundreds of
# attributes on each of eight intermediates cost a second of CPU a call, every call of the
# process waiting (reviews 3 and 4, session 18).
MAX_EXTENSIONS, MAX_NAME_ATTRIBUTES = 64, 32
_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_T = TypeVar("_T", bound=x509.ExtensionType)
# What cryptography raises for malformed input; several of these are not ValueErrors.
_PARSE_ERRORS = (ValueError, TypeError, UnsupportedAlgorithm, x509.DuplicateExtension,
                 x509.InvalidVersion, x509.UnsupportedGeneralNameType)


class CertificateParseError(ValueError):
    """The bytes are not a certificate; the message never echoes them (they may be anything)."""


class _HardwareModuleName(core.Sequence):
    """RFC 4108 HardwareModuleName, which cryptography hands over as undecoded DER."""

    _fields = [("hw_type", core.ObjectIdentifier), ("hw_serial_num", core.OctetString)]


@dataclass(frozen=True)
class CertificateVerdict:
    valid: bool
    problems: tuple[Problem, ...]
    subject: str = ""
    issuer: str = ""
    serial_hex: str = ""
    not_before: datetime | None = None
    not_after: datetime | None = None  # None: the certificate never expires
    device_id: str = ""
    public_key_algorithm: str = ""

    @property
    def problem_codes(self) -> tuple[str, ...]:
        return tuple(p.code for p in self.problems)


@dataclass(frozen=True)
class TrustStore:
    anchors: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...] = ()

    @classmethod
    def from_dir(cls, path: str | Path) -> "TrustStore":
        """Read the configured trust anchors and CRLs.

        A missing folder is an empty store (the development default starts with none), but
        an unreadable file raises: silently dropping an anchor or a CRL would change verdicts
        without anyone noticing.
        """
        folder = Path(path)
        anchors: list[x509.Certificate] = []
        crls: list[x509.CertificateRevocationList] = []
        if not folder.is_dir():
            return cls(())
        for file in sorted(p for p in folder.iterdir() if p.is_file()):
            suffix = file.suffix.lower()
            if suffix not in (".pem", ".crt", ".crl"):
                continue
            data = file.read_bytes()
            try:
                if suffix in (".pem", ".crt"):
                    anchors.extend(x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data
                                   else [x509.load_der_x509_certificate(data)])
                else:
                    crls.append(x509.load_pem_x509_crl(data) if b"-----BEGIN" in data
                                else x509.load_der_x509_crl(data))
            except _PARSE_ERRORS:
                raise CertificateParseError(
                    f"trust store file {file.name} does not parse") from None
        return cls(tuple(anchors), tuple(crls))


def load_certificate(data: bytes) -> x509.Certificate:
    """Parse DER or PEM, forcing the lazily parsed parts so that later checks cannot raise."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CertificateParseError("a certificate must be given as bytes")
    raw = bytes(data)  # never strip DER: its last byte may well be 0x0A or 0x20
    try:
        cert = (x509.load_pem_x509_certificate(raw) if raw.lstrip().startswith(b"-----BEGIN")
                else x509.load_der_x509_certificate(raw))
        subject, issuer = cert.subject, cert.issuer
        _ = (cert.extensions, cert.not_valid_before_utc, cert.not_valid_after_utc,
             subject.rfc4514_string(), issuer.rfc4514_string(), cert.serial_number)
    except _PARSE_ERRORS as exc:
        raise CertificateParseError(
            f"not a DER or PEM X.509 certificate ({type(exc).__name__})") from None
    sizes = (len(cert.extensions), len(subject), len(issuer))
    if sizes[0] > MAX_EXTENSIONS or max(sizes[1:]) > MAX_NAME_ATTRIBUTES:
        raise CertificateParseError(
            f"a certificate with {sizes[0]} extensions and names of {sizes[1]} and {sizes[2]} "
            f"attributes: at most {MAX_EXTENSIONS} and {MAX_NAME_ATTRIBUTES}")
    return cert


def verify_device_certificate(certificate: bytes, chf_identifier: str | None,
                              trust: TrustStore, *, intermediates: Sequence[bytes] = (),
                              at: datetime | None = None) -> CertificateVerdict:
    """Check a CHF certificate against every rule of the device profile.

    `chf_identifier=None` is for callers who only want to read a certificate: the
    hardwareModuleName is still required, as without it the certificate names no device.
    A naive `at` is taken as UTC.
    """
    try:
        cert = load_certificate(certificate)
    except CertificateParseError as exc:
        return CertificateVerdict(False, (_problem("CERT_PARSE", str(exc)),))
    problems: list[Problem] = []
    chain: list[x509.Certificate] = []
    for index, raw in enumerate(intermediates):
        try:
            chain.append(load_certificate(raw))
        except CertificateParseError as exc:
            problems.append(_problem("CERT_PARSE", f"intermediate {index}: {exc}"))
    when = datetime.now(timezone.utc) if at is None else (
        at if at.tzinfo else at.replace(tzinfo=timezone.utc))
    problems += _chain_problems(cert, tuple(chain), trust.anchors)
    problems += _validity_problems(cert, when)
    device_id, device_problems = _device(cert, chf_identifier)
    problems += device_problems
    problems += _key_usage_problems(cert)
    problems += _ca_problems(cert)
    algorithm, algorithm_problems = _key_algorithm(cert)
    problems += algorithm_problems
    problems += _revocation_problems(cert, trust, tuple(chain))
    not_after = cert.not_valid_after_utc
    return CertificateVerdict(
        valid=not problems, problems=tuple(problems),
        subject=cert.subject.rfc4514_string(), issuer=cert.issuer.rfc4514_string(),
        serial_hex=_serial_hex(cert.serial_number), not_before=cert.not_valid_before_utc,
        not_after=None if not_after == NO_EXPIRY else not_after,
        device_id=device_id, public_key_algorithm=algorithm)


def _problem(code: str, message: str) -> Problem:
    return Problem(code, message, FIELD)


def _ext(cert: x509.Certificate, kind: type[_T]) -> x509.Extension[_T] | None:
    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None


def _serial_hex(serial: int) -> str:
    """Whole octets, as the serial is written in DER and shown by openssl and the SMKI."""
    digits = format(abs(serial), "X")
    return ("-" if serial < 0 else "") + digits.zfill(len(digits) + len(digits) % 2)


def _may_have_issued(issuer: x509.Certificate, cert: x509.Certificate) -> bool:
    """Name match, narrowed by key identifiers: a CA re-keyed under the same name is common."""
    if issuer.subject != cert.issuer:
        return False
    aki, ski = _ext(cert, x509.AuthorityKeyIdentifier), _ext(issuer, x509.SubjectKeyIdentifier)
    if aki is None or ski is None or aki.value.key_identifier is None:
        return True
    return aki.value.key_identifier == ski.value.digest


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False


def _is_ca(cert: x509.Certificate) -> bool:
    """Only a CA may stand between a device and its anchor, or any device key could sign."""
    constraints, usage = _ext(cert, x509.BasicConstraints), _ext(cert, x509.KeyUsage)
    return (constraints is not None and constraints.value.ca
            and (usage is None or usage.value.key_cert_sign))


def _path(cert: x509.Certificate, chain: tuple[x509.Certificate, ...],
          anchors: tuple[x509.Certificate, ...]) -> str:
    """'ok', 'signature' (a path exists by name but a signature on it fails) or 'none'.

    Separating the last two is the point: a tampered certificate from a known CA is a
    different finding (CERT_SIGNATURE) from a certificate of an unknown CA (CERT_CHAIN).

    The certificates are numbered (the anchors, the device's, the intermediates); each is
    searched from once a depth, and each question asked of a pair (may this one have
    issued that one? did it sign it?) is answered once. A search of every ordering of
    eight intermediates that all name the anchor took 13 s of CPU a call from a 2.7 KB
    request (review, session 18); names and extensions looked at again at each step, up
    to a second (reviews 3 and 4; `load_certificate` bounds their size). A path may pass
    a certificate twice; that changes no verdict, since the path without the loop is
    shorter and as good.
    """
    nodes = (*anchors, cert, *chain)
    first = len(anchors)  # nodes[first] is the device's certificate
    issued: dict[tuple[int, int], bool] = {}
    signed: dict[tuple[int, int], bool] = {}
    is_ca: dict[int, bool] = {}
    searched: dict[tuple[int, int], str] = {}

    def may_have_issued(i: int, j: int) -> bool:
        if (i, j) not in issued:
            issued[i, j] = _may_have_issued(nodes[i], nodes[j])
        return issued[i, j]

    def signed_by(j: int, i: int) -> bool:
        if (j, i) not in signed:
            signed[j, i] = _signed_by(nodes[j], nodes[i])
        return signed[j, i]

    def ca(i: int) -> bool:
        if i not in is_ca:
            is_ca[i] = _is_ca(nodes[i])
        return is_ca[i]

    def search(j: int, depth: int) -> str:
        if (j, depth) in searched:
            return searched[j, depth]
        best = "none"
        for a in range(first):
            if may_have_issued(a, j):
                if signed_by(j, a):
                    best = "ok"
                    break
                best = "signature"
        if best != "ok" and depth < _MAX_PATH:
            for i in range(first + 1, len(nodes)):
                if i == j or not ca(i) or not may_have_issued(i, j):
                    continue
                above = search(i, depth + 1)
                if above == "ok" and signed_by(j, i):
                    best = "ok"
                    break
                if above != "none":
                    best = "signature"
        searched[j, depth] = best
        return best
    return search(first, 1)


def _chain_problems(cert: x509.Certificate, chain: tuple[x509.Certificate, ...],
                    anchors: tuple[x509.Certificate, ...]) -> list[Problem]:
    status = _path(cert, chain, anchors)
    if status == "signature":
        return [_problem("CERT_SIGNATURE",
                         "a signature on the path to the trust anchor does not verify")]
    if status == "none":
        return [_problem("CERT_CHAIN", f"no path from issuer {cert.issuer.rfc4514_string()!r} "
                                       "to a configured trust anchor")]
    return []


def _validity_problems(cert: x509.Certificate, when: datetime) -> list[Problem]:
    if when < cert.not_valid_before_utc:
        return [_problem("CERT_NOT_YET_VALID",
                         f"not valid before {cert.not_valid_before_utc.isoformat()}")]
    if cert.not_valid_after_utc != NO_EXPIRY and when > cert.not_valid_after_utc:
        return [_problem("CERT_EXPIRED", f"expired {cert.not_valid_after_utc.isoformat()}")]
    return []


def _device(cert: x509.Certificate, chf_identifier: str | None) -> tuple[str, list[Problem]]:
    """The device identity is the hwSerialNum; the subject is empty in the GB profile."""
    san = _ext(cert, x509.SubjectAlternativeName)
    names = [n for n in (san.value if san else []) if isinstance(n, x509.OtherName)
             and n.type_id == HARDWARE_MODULE_NAME]
    if len(names) != 1:
        return "", [_problem("CERT_DEVICE_MISMATCH", f"subjectAltName holds {len(names)} "
                             "hardwareModuleName entries, the profile requires exactly one")]
    try:
        serial = _HardwareModuleName.load(names[0].value, strict=True)["hw_serial_num"].native
        device_id = eui64_from_bytes(serial)
    except (ValueError, TypeError, InvalidEUI64):
        return "", [_problem("CERT_DEVICE_MISMATCH", "hwSerialNum is not the 8 bytes of an EUI-64")]
    if chf_identifier is None:
        return device_id, []
    if not chf_identifier.strip():  # api.md's chf_identifier is not optional
        return device_id, [_problem("CERT_DEVICE_MISMATCH", "no CHF identifier was given "
                                    "to compare hwSerialNum with")]
    try:
        expected = normalise_eui64(chf_identifier)
    except InvalidEUI64:
        return device_id, [_problem("CERT_DEVICE_MISMATCH", "the CHF identifier is not an EUI-64")]
    if device_id != expected:
        return device_id, [_problem("CERT_DEVICE_MISMATCH",
                                    f"certificate names device {device_id}, not {expected}")]
    return device_id, []


def _key_usages(usage: x509.KeyUsage) -> set[str]:
    names = {"digitalSignature": usage.digital_signature,
             "nonRepudiation": usage.content_commitment,
             "keyEncipherment": usage.key_encipherment, "dataEncipherment": usage.data_encipherment,
             "keyAgreement": usage.key_agreement, "keyCertSign": usage.key_cert_sign,
             "cRLSign": usage.crl_sign}
    if usage.key_agreement:  # cryptography refuses to read these two otherwise
        names |= {"encipherOnly": usage.encipher_only, "decipherOnly": usage.decipher_only}
    return {name for name, on in names.items() if on}


def _key_usage_problems(cert: x509.Certificate) -> list[Problem]:
    """A device key is for one purpose only: signing or ECDH, never both, never more."""
    usage = _ext(cert, x509.KeyUsage)
    if usage is None:
        return [_problem("CERT_KEY_USAGE", "keyUsage is missing")]
    problems = [] if usage.critical else [_problem("CERT_KEY_USAGE", "keyUsage is not critical")]
    bits = _key_usages(usage.value)
    if bits not in ({"digitalSignature"}, {"keyAgreement"}):
        problems.append(_problem("CERT_KEY_USAGE", f"keyUsage is {sorted(bits)}, not exactly "
                                 "digitalSignature or exactly keyAgreement"))
    return problems


def _ca_problems(cert: x509.Certificate) -> list[Problem]:
    constraints, usage = _ext(cert, x509.BasicConstraints), _ext(cert, x509.KeyUsage)
    if (constraints and constraints.value.ca) or (usage and usage.value.key_cert_sign):
        return [_problem("CERT_IS_CA",
                         "a device certificate must not be able to issue certificates")]
    return []


def _key_algorithm(cert: x509.Certificate) -> tuple[str, list[Problem]]:
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        name = cert.public_key_algorithm_oid.dotted_string
        return name, [_problem("CERT_KEY_ALGORITHM", f"public key {name} is not usable")]
    if isinstance(key, ec.EllipticCurvePublicKey):
        name = f"ECDSA {_CURVES.get(key.curve.name, key.curve.name)}"
    elif isinstance(key, rsa.RSAPublicKey):
        name = f"RSA {key.key_size}"
    elif isinstance(key, ed25519.Ed25519PublicKey):
        name = "Ed25519"
    else:  # nothing a GB device uses; the OID at least tells the operator what it was
        name = cert.public_key_algorithm_oid.dotted_string
    if name != "ECDSA P-256":
        return name, [_problem("CERT_KEY_ALGORITHM", f"public key is {name}, not ECDSA P-256")]
    return name, []


def _revocation_problems(cert: x509.Certificate, trust: TrustStore,
                         chain: tuple[x509.Certificate, ...]) -> list[Problem]:
    """A CRL from a CA we know must carry its signature; one from an unknown CA is trusted as
    configured, since an operator placing it can only make verdicts stricter."""
    for crl in trust.crls:
        if crl.issuer != cert.issuer:
            continue
        signers = [ca for ca in trust.anchors + chain if ca.subject == crl.issuer]
        if signers and not any(_crl_signed_by(crl, ca) for ca in signers):
            continue
        if _lists(crl, cert.serial_number):
            return [_problem("CERT_REVOKED", f"serial {_serial_hex(cert.serial_number)} is revoked "
                                             f"by {crl.issuer.rfc4514_string()!r}")]
    return []


def _lists(crl: x509.CertificateRevocationList, serial: int) -> bool:
    try:
        return crl.get_revoked_certificate_by_serial_number(serial) is not None
    except ValueError:  # cryptography's lookup refuses negative serials, which DER allows
        return any(entry.serial_number == serial for entry in crl)


def _crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False
