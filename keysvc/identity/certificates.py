"""What a client certificate says about its caller, and whether keysvc accepts it at all.

TLS has verified the chain and dates for the connection. What is left is the shape of an
identity: exactly one role URI, one plain-ASCII CN, not a CA, and the clientAuth extended
key usage. A certificate never changes, so it is parsed once (LRU).
"""
from __future__ import annotations

import functools
import hashlib
import re

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keysvc.identity.caller import Caller
from keysvc.pki import ROLE_URI_PREFIX

# A CN an officer is known by: ASCII letters, digits, space and . ' _ -, so that no
# zero-width character, look-alike script or control character makes one officer two.
CN = re.compile(r"[A-Za-z0-9][A-Za-z0-9 .'_-]{0,63}")


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's public key (SPKI), hex: what an officer is."""
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def issuer_key(name: x509.Name) -> str:
    """How a CRL and a certificate name the same issuer (SHA-256 of the DER name)."""
    return hashlib.sha256(name.public_bytes()).hexdigest()


def caller_from_pem(pem: bytes) -> Caller:
    return _caller_of(pem)


@functools.lru_cache(maxsize=1024)
def _caller_of(pem: bytes) -> Caller:
    try:
        cert = x509.load_pem_x509_certificate(pem)
        return Caller(_cn(cert), role_of(cert), fingerprint(cert), refusal(cert),
                      serial=format(cert.serial_number, "x"), issuer=issuer_key(cert.issuer))
    except Exception:  # a certificate TLS took but this parser cannot read: refused
        return Caller("", "", "", "the certificate cannot be parsed")


def _cn(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else ""


def _role_uris(cert: x509.Certificate) -> list[str]:
    try:
        uris = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    return [u for u in uris if u.lower().startswith(ROLE_URI_PREFIX)]  # URNs ignore case


def role_of(cert: x509.Certificate) -> str:
    roles = _role_uris(cert)
    return roles[0][len(ROLE_URI_PREFIX):] if len(roles) == 1 else ""


def refusal(cert: x509.Certificate) -> str:
    """Why this certificate is not one identity with one role, for a client ("" if it is)."""
    roles = _role_uris(cert)
    if len(roles) != 1 or not roles[0].startswith(ROLE_URI_PREFIX):
        return f"the certificate names {len(roles)} roles, not one (in canonical form)"
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or not CN.fullmatch(str(cns[0].value)):
        return ("the certificate needs one common name (CN) of ASCII letters, digits, "
                "spaces and . ' _ -")
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "the certificate is a CA certificate"
    except x509.ExtensionNotFound:
        pass
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = []
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        return "the certificate lacks the clientAuth extended key usage"
    return ""


def issued_by_one_of(cert: x509.Certificate, cas: list[x509.Certificate]) -> bool:
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
            return True
        except Exception:
            continue
    return False


def load_bundle(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)
