"""The caller of one request, as the interceptor admitted it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    """Who is calling: identity from the certificate CN (for an officer, the enrolled
    display name), role from its SAN URI, and the SHA-256 of its public key (SPKI), which
    is what an officer is, whatever the CN says. `refusal`: why the certificate is not
    accepted for keysvc's services ("" if it is)."""

    identity: str
    role: str
    fingerprint: str = ""
    refusal: str = ""
    serial: str = ""   # hex, for the issuer's CRL
    issuer: str = ""   # the signing client CA's key fingerprint (its CRLs are kept under it)
