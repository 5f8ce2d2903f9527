"""Client-certificate CRLs: read from a directory, checked against the client CA, and
remembered in the roster.

A CRL is accepted only if one of the client CA certificates (the bundle TLS verifies
callers with) signed it, and only if its CRL number is not below the highest seen from
that CA. Its revoked serials are added to the roster in the HSM, so a CRL file deleted or
replaced by an older one on the host un-revokes nothing. (A certificate taken off hold
therefore stays revoked: issue a new one.) The directory is read at start, on SIGHUP and
every `client_crl_refresh_seconds`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from cryptography import x509

from keysvc.identity.certificates import fingerprint
from keysvc.identity.roster import Roster

log = logging.getLogger("keysvc.identity.crls")

MAX_CRL_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class CrlLoad:
    read: int = 0        # CRL files accepted
    refused: int = 0     # files that are not a CRL signed by a client CA, or are older
    new_serials: int = 0


def _parse(data: bytes) -> x509.CertificateRevocationList:
    if b"-----BEGIN X509 CRL-----" in data:
        return x509.load_pem_x509_crl(data)
    return x509.load_der_x509_crl(data)


def _number(crl: x509.CertificateRevocationList) -> int:
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return 0


def load_dir(directory: Path, cas: tuple[x509.Certificate, ...], roster: Roster,
             report: Callable[[str, str], None]) -> CrlLoad:
    """Read every CRL in `directory`; `report(action, detail)` for each refused file and
    for revocations learned (the caller audits them)."""
    if not directory.is_dir():
        return CrlLoad()
    found: dict[str, tuple[int, set[str]]] = {}
    read = refused = 0
    for path in sorted(directory.iterdir()):
        if not path.is_file():
            continue
        try:  # everything about one file, so that one bad file stops no other
            if path.stat().st_size > MAX_CRL_BYTES:
                raise ValueError("too large")
            crl = _parse(path.read_bytes())
            ca = next((c for c in cas if c.subject == crl.issuer
                       and crl.is_signature_valid(c.public_key())),  # type: ignore[arg-type]
                      None)
            if ca is None:
                raise ValueError("not signed by a client CA")
            revoked = {format(r.serial_number, "x") for r in crl}
            crl_number = _number(crl)
        except Exception as exc:
            refused += 1
            log.error("client CRL %s refused: %s", path.name, str(exc)[:120])
            report("client_crl.refused", f"{path.name[:64]}: {str(exc)[:120]}")
            continue
        read += 1
        # Kept under the key of the CA that signed it: what a caller's certificate names
        # as its issuer (Caller.issuer), however either encodes the CA's name.
        key = fingerprint(ca)
        number, serials = found.setdefault(key, (0, set()))
        serials.update(revoked)
        found[key] = (max(number, crl_number), serials)
    if not found:
        return CrlLoad(read, refused)
    state = roster.current()
    learned = 0
    for key, (number, serials) in found.items():
        known_number, known = state.crl.get(key, (0, frozenset()))
        if number < known_number:
            refused += 1
            report("client_crl.refused", f"CRL number {number} is older than {known_number} "
                                         "already seen from that CA")
        learned += len(serials - known)
    if learned:
        def add(st):
            crl = dict(st.crl)
            for key, (number, serials) in found.items():
                old_number, old = crl.get(key, (0, frozenset()))
                crl[key] = (max(number, old_number), frozenset(old | serials))
            return replace(st, crl=crl)
        roster.change(add)
        report("client_crl.loaded", f"{learned} newly revoked client certificate serial(s)")
    return CrlLoad(read, refused, learned)
