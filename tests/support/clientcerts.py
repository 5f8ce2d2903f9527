"""Client certificates made for a test by a server's development CA (tests' own PKI)."""
from __future__ import annotations

import datetime as dt
import shutil

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keysvc.client import connect
from keysvc.pki import ROLE_URI_PREFIX


def dev_ca(server):
    pki = server.state_dir / "pki"
    return (x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes()),
            serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None))


def crl(server, serials: list[int], number: int = 1, signer=None) -> bytes:
    """A CRL of the development CA (or of `signer`, a (cert, key) pair), PEM."""
    ca_cert, ca_key = signer or dev_ca(server)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
         .last_update(now).next_update(now + dt.timedelta(days=1))
         .add_extension(x509.CRLNumber(number), False))
    for serial in serials:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                      .revocation_date(now).build())
    return b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def issue(server, tmp, filename: str, *, cn: str | None, roles=("security-officer",),
           ca: bool = False, eku=(ExtendedKeyUsageOID.CLIENT_AUTH,), key=None,
           enroll: bool = False):
    """A client certificate from the server's development CA, written as tmp/pki/NAME;
    `enroll`: its key enrolled as an officer (under dual control) too."""
    pki = server.state_dir / "pki"
    ca_cert, ca_key = dev_ca(server)
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else
                        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "no CN")])
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now).not_valid_after(now + dt.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True))
    if roles:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(ROLE_URI_PREFIX + r) for r in roles]), False)
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), False)
    cert = b.sign(ca_key, hashes.SHA256())
    (tmp / "pki").mkdir(exist_ok=True)
    shutil.copy(pki / "ca.pem", tmp / "pki" / "ca.pem")
    (tmp / "pki" / f"{filename}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "pki" / f"{filename}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    if enroll:
        server.enroll(cert.public_bytes(serialization.Encoding.PEM))
    return connect(server.target, tmp, filename), key
