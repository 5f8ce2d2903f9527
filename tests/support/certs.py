"""Test PKI in the GB SMKI device profile, made on the fly with pyca/cryptography.

Tests make their own CAs and device certificates rather than shipping fixtures, so that each
rule can be broken one at a time (a key usage, a validity, a hwSerialNum...) while every
other field stays as a real device certificate has it.

    root = make_ca("Test Root")
    issuing = make_ca("Test Device CA", parent=root)
    device_cert, device_key = make_device_cert(issuing[1], issuing[0], "00-DB-12-34-56-78-90-01")
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Iterable, Union

from asn1crypto import core
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from keysvc.domain import eui64_bytes

PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey,
                   ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey]
CA = tuple[x509.Certificate, PrivateKey]

HARDWARE_MODULE_NAME = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.4")
GB_HW_TYPE = "1.2.826.0.1.8641679.1.2.2.1"
GB_DEVICE_POLICY = x509.ObjectIdentifier("1.2.826.0.1.1800000.1.2.1.4")
NO_EXPIRY = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)
DEFAULT_NOT_BEFORE = datetime(2016, 4, 6, tzinfo=timezone.utc)

# RFC 5280 names, so that tests read like the profile.
_KEY_USAGE_ARGS = {
    "digitalSignature": "digital_signature", "nonRepudiation": "content_commitment",
    "keyEncipherment": "key_encipherment", "dataEncipherment": "data_encipherment",
    "keyAgreement": "key_agreement", "keyCertSign": "key_cert_sign", "cRLSign": "crl_sign",
    "encipherOnly": "encipher_only", "decipherOnly": "decipher_only",
}


class _HardwareModuleName(core.Sequence):
    _fields = [("hw_type", core.ObjectIdentifier), ("hw_serial_num", core.OctetString)]


def make_key(kind: str = "p256") -> PrivateKey:
    """kind: p256, p384, rsa2048, rsa3072, ed25519."""
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[3:]))
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key kind {kind!r}")


def make_key_usage(*names: str) -> x509.KeyUsage:
    """A KeyUsage from RFC 5280 bit names, e.g. make_key_usage("digitalSignature")."""
    flags = {arg: False for arg in _KEY_USAGE_ARGS.values()}
    for name in names:
        flags[_KEY_USAGE_ARGS[name]] = True
    return x509.KeyUsage(**flags)


def hardware_module_name(hw_serial: bytes, hw_type: str = GB_HW_TYPE) -> x509.OtherName:
    """The RFC 4108 otherName that carries a device's EUI-64 in the GB profile."""
    value = _HardwareModuleName({"hw_type": hw_type, "hw_serial_num": hw_serial}).dump()
    return x509.OtherName(HARDWARE_MODULE_NAME, value)


def make_ca(name: str, *, key: PrivateKey | None = None, parent: CA | None = None,
            not_before: datetime = datetime(2015, 1, 1, tzinfo=timezone.utc),
            not_after: datetime = NO_EXPIRY, serial: int | None = None) -> CA:
    """A root CA (no parent) or a CA issued by `parent`, a (cert, key) from make_ca.

    To make an impostor, pass `parent=(real_ca_cert, other_key)`: the name and key identifier
    point at the real CA but the signature is not its.
    """
    key = key or make_key("p256")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = parent if parent else (None, key)
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer_cert.subject if issuer_cert else subject)
               .public_key(key.public_key())
               .serial_number(serial or x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(make_key_usage("keyCertSign", "cRLSign"), critical=True)
               .add_extension(_ski(key), critical=False))
    if issuer_cert is not None:
        builder = builder.add_extension(_aki(issuer_cert, issuer_key), critical=False)
    return builder.sign(issuer_key, _hash_for(issuer_key)), key


def make_device_cert(
    issuer_key: PrivateKey, issuer_cert: x509.Certificate,
    chf: str = "00-DB-12-34-56-78-90-01", *,
    key_usage: str | Iterable[str] | None = "digitalSignature",
    key_usage_critical: bool = True,
    ca: bool | None = None,
    key: PrivateKey | None = None,
    key_type: str = "p256",
    not_before: datetime = DEFAULT_NOT_BEFORE,
    not_after: datetime = NO_EXPIRY,
    serial: int | None = None,
    hw_serial: bytes | None = None,
    san: bool = True,
    subject: x509.Name | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A GB-profile device certificate for `chf`, issued by (issuer_cert, issuer_key).

    Defaults follow the SMKI device profile; each keyword breaks one thing: `key_usage`
    (name or names; None omits the extension), `ca` (None: no basicConstraints, as in the
    profile), `key_type` or `key`, validity, `serial`, `hw_serial` (raw bytes instead of the
    chf's 8), `san=False` (no subjectAltName at all).
    """
    key = key or make_key(key_type)
    builder = (x509.CertificateBuilder()
               .subject_name(subject or x509.Name([]))
               .issuer_name(issuer_cert.subject)
               .public_key(key.public_key())
               .serial_number(serial or x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(_ski(key), critical=False)
               .add_extension(_aki(issuer_cert, issuer_key), critical=False)
               .add_extension(x509.CertificatePolicies(
                   [x509.PolicyInformation(GB_DEVICE_POLICY, None)]),
                              critical=True))
    if key_usage is not None:
        names = (key_usage,) if isinstance(key_usage, str) else tuple(key_usage)
        builder = builder.add_extension(make_key_usage(*names), critical=key_usage_critical)
    if san:
        serial_bytes = eui64_bytes(chf) if hw_serial is None else hw_serial
        builder = builder.add_extension(
            x509.SubjectAlternativeName([hardware_module_name(serial_bytes)]), critical=True)
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None),
                                        critical=True)
    return builder.sign(issuer_key, _hash_for(issuer_key)), key


def make_crl(issuer_key: PrivateKey, issuer_cert: x509.Certificate, revoked_serials: Iterable[int],
             *, last_update: datetime = datetime(2024, 1, 1, tzinfo=timezone.utc),
             next_update: datetime = datetime(2099, 1, 1, tzinfo=timezone.utc)
             ) -> x509.CertificateRevocationList:
    builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer_cert.subject)
               .last_update(last_update).next_update(next_update))
    for serial in revoked_serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial)
            .revocation_date(last_update).build())
    return builder.sign(issuer_key, _hash_for(issuer_key))


def der(obj: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    return obj.public_bytes(serialization.Encoding.DER)


def pem(obj: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    return obj.public_bytes(serialization.Encoding.PEM)


def _hash_for(key: PrivateKey) -> hashes.HashAlgorithm | None:
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _ski(key: PrivateKey) -> x509.SubjectKeyIdentifier:
    """8 bytes, as SMKI certificates have them (truncated SHA-1 of the public key)."""
    return x509.SubjectKeyIdentifier(
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest[:8])


def _aki(issuer_cert: x509.Certificate, issuer_key: PrivateKey) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        ski = _ski(issuer_key)
    return x509.AuthorityKeyIdentifier(ski.digest, None, None)
