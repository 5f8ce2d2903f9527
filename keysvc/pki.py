"""The development PKI: a local CA, the server certificate and one client per role.

Roles travel in the certificate (SAN URI urn:keysvc:role:<role>), identities in the CN,
exactly as production callers' certificates will carry them, so development exercises the
same authorisation path.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLE_URI_PREFIX = "urn:keysvc:role:"
CLIENTS: dict[str, str] = {
    "s1sp": "s1sp", "dco": "dco", "security-officer-1": "security-officer",
    "security-officer-2": "security-officer", "auditor": "auditor",
}


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def issue(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, cn: str, *,
          role: str | None = None, server: bool = False, days: int = 825
          ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    sans: list[x509.GeneralName] = []
    if role:
        sans.append(x509.UniformResourceIdentifier(ROLE_URI_PREFIX + role))
    if server:
        sans += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
               .add_extension(x509.SubjectAlternativeName(sans), False)
               .add_extension(x509.ExtendedKeyUsage(
                   [ExtendedKeyUsageOID.SERVER_AUTH if server
                    else ExtendedKeyUsageOID.CLIENT_AUTH]), False))
    return builder.sign(ca_key, hashes.SHA256()), key


def ensure_dev_pki(pki_dir: Path) -> None:
    """Create DIR/pki/{ca,server,<client>}.{pem,key} once; an existing PKI is kept."""
    pki_dir.mkdir(parents=True, exist_ok=True)
    ca_pem, ca_key_path = pki_dir / "ca.pem", pki_dir / "ca.key"
    if ca_pem.exists() and ca_key_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
        loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{ca_key_path} is not the development CA's P-256 key")
        ca_key = loaded
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
        ca_cert = (x509.CertificateBuilder().subject_name(_name("keysvc development CA"))
                   .issuer_name(_name("keysvc development CA")).public_key(ca_key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now)
                   .not_valid_after(now + dt.timedelta(days=3650))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
                   .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                                False, False), True)
                   .sign(ca_key, hashes.SHA256()))
        _write_key(ca_key_path, ca_key)
        ca_pem.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    wanted = {"server": None, **CLIENTS}
    for name, role in wanted.items():
        cert_path, key_path = pki_dir / f"{name}.pem", pki_dir / f"{name}.key"
        if cert_path.exists() and key_path.exists():
            continue
        cert, key = issue(ca_cert, ca_key, "localhost" if name == "server" else name,
                          role=role, server=name == "server")
        _write_key(key_path, key)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
