"""What a client certificate says about its caller, and whether keysvc accepts it at all.

TLS has verified the chain and dates for the connection. What is left is the shape of an
identity: exactly one role URI, one plain-ASCII CN, not a CA, and the clientAuth extended
key usage. A certificate never changes, so it is parsed once (LRU).
"""
from __future__ import annotations

import functools
import hashlib
import re
from typing import Iterable

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


def caller_from_pem(pem: bytes, cas: tuple[x509.Certificate, ...] = ()) -> Caller:
    """The caller a certificate names. `cas`: the client CA bundle; the CA that signed the
    certificate is named by its key's fingerprint (`Caller.issuer`), which is how its CRLs
    are kept (names can be encoded two ways and still be equal)."""
    return _caller_of(pem, cas)


@functools.lru_cache(maxsize=1024)
def _caller_of(pem: bytes, cas: tuple[x509.Certificate, ...]) -> Caller:
    try:
        cert = x509.load_pem_x509_certificate(pem)
        issuer = issuer_of(cert, cas)
        return Caller(_cn(cert), role_of(cert), fingerprint(cert), refusal(cert),
                      serial=format(cert.serial_number, "x"),
                      issuer=fingerprint(issuer) if issuer is not None else "")
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
        usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        usages = []
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        return "the certificate lacks the clientAuth extended key usage"
    return ""


def issuer_of(cert: x509.Certificate, cas: Iterable[x509.Certificate]
              ) -> x509.Certificate | None:
    """The CA of the bundle that signed `cert`, or None."""
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
            return ca
        except Exception:
            continue
    return None


def load_bundle(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)
