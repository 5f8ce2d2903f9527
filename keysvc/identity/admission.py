"""Who may call keysvc: the certificate's shape, the roster in the HSM, revocation.

A call is admitted in three steps (the interceptor runs them on every call, so a
revocation reaches channels that were open before it):
1. the certificate is one identity with one role (`certificates.refusal`);
2. its key is not denied and its serial not revoked by a CRL of its CA (the roster);
3. a security officer's key is enrolled; the officer is then known by the enrolled
   display name, whatever the certificate's CN says.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from keysvc.errors import error
from keysvc.identity import certificates
from keysvc.identity.caller import Caller
from keysvc.identity.roster import Officer, Roster, RosterState

if TYPE_CHECKING:
    from keysvc.app import App

log = logging.getLogger("keysvc.identity")

OFFICER_ROLE = "security-officer"


def admit(app: App, caller: Caller) -> Caller:
    """The caller as keysvc knows it, or CERTIFICATE_REVOKED / OFFICER_NOT_ENROLLED."""
    roster = app.roster.current()
    if roster.denial(caller.fingerprint) is not None:
        raise error("CERTIFICATE_REVOKED", "the certificate's key is on keysvc's deny list")
    if caller.issuer and roster.serial_revoked(caller.issuer, caller.serial):
        raise error("CERTIFICATE_REVOKED", "the certificate is revoked by its CA's CRL")
    if caller.role == OFFICER_ROLE:
        officer = roster.officer(caller.fingerprint)
        if officer is None:
            raise error("OFFICER_NOT_ENROLLED", "this certificate's key is not an enrolled "
                        f"security officer (fingerprint {caller.fingerprint[:16]}...)")
        if not app.vouched.counts(caller.fingerprint):
            raise error("OFFICER_NOT_ENROLLED", f"this officer is not one the "
                        f"{app.vouched.partition} token vouches for (enrolled through "
                        "another organisation's process): ask this organisation's officers")
        return replace(caller, identity=officer.name)
    return caller


def client_cas(app: App) -> tuple[x509.Certificate, ...]:
    """The client CA bundle TLS verifies callers with, read once per process (as TLS does)."""
    cas = getattr(app, "_client_cas", None)
    if cas is None:
        cas = tuple(certificates.load_bundle(app.settings.tls_files[2].read_bytes()))
        app._client_cas = cas  # type: ignore[attr-defined]
    return cas


def officer_from_pem(pem: bytes, cas: tuple[x509.Certificate, ...], name: str = ""
                     ) -> Officer:
    """An officer-to-be from its certificate: accepted shape, the officer role, issued by
    a client CA. The display name defaults to the CN."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise error("INVALID_CERTIFICATE", "the officer's certificate is not a PEM "
                                           "X.509 certificate") from None
    try:  # extensions and the key are parsed here, and may be malformed
        why = certificates.refusal(cert)
        role = certificates.role_of(cert)
        key = certificates.fingerprint(cert)
        issued = certificates.issuer_of(cert, cas) is not None
    except Exception:
        raise error("CERTIFICATE_NOT_ACCEPTED", "the certificate's extensions or key cannot "
                                                "be read") from None
    if why:
        raise error("CERTIFICATE_NOT_ACCEPTED", why)
    if role != OFFICER_ROLE:
        raise error("CERTIFICATE_NOT_ACCEPTED", "the certificate's role is not "
                                                "security-officer")
    if not issued:
        raise error("CERTIFICATE_NOT_ACCEPTED", "the certificate is not issued by the "
                                                "client CA keysvc trusts")
    name = name or certificates.caller_from_pem(pem).identity
    if not certificates.CN.fullmatch(name):
        raise error("INVALID_REQUEST", "an officer's display name is 1-64 ASCII letters, "
                    "digits, spaces and . ' _ -", field="display_name")
    return Officer(key, name)


def initial_officer_files(app: App) -> list[Path]:
    s = app.settings
    if s.initial_officers:
        return [Path(p.strip()) for p in s.initial_officers.split(",") if p.strip()]
    if s.dev:
        return [s.path("pki", "security-officer-1.pem"), s.path("pki", "security-officer-2.pem")]
    return []


def seed_roster(app: App) -> None:
    """At start: the first officers, if the token has none yet. After that the roster in
    the token rules, and `initial_officers` is ignored (enrolment is dual control)."""
    if app.roster.exists():
        return
    files = initial_officer_files(app)
    if not files:
        raise SystemExit("no security officers are enrolled: set initial_officers to the "
                         "certificate files of the first officers (at least the quorum)")
    cas = client_cas(app)
    officers: list[Officer] = []
    for f in files:
        try:
            officer = officer_from_pem(f.read_bytes(), cas)
        except Exception as exc:
            raise SystemExit(f"initial officer {f}: {getattr(exc, 'message', exc)}") from None
        if any(o.fingerprint == officer.fingerprint for o in officers) or \
                RosterState(officers=tuple(officers)).officer_named(officer.name):
            raise SystemExit(f"initial officer {f}: the same key or name twice")
        officers.append(officer)
    if len(officers) < app.settings.quorum:
        raise SystemExit(f"initial_officers names {len(officers)} officers; the quorum is "
                         f"{app.settings.quorum}")
    app.roster.seed(officers)
    log.info("enrolled the first %d officers: %s", len(officers),
             ", ".join(o.name for o in officers))


def seed_vouched(app: App) -> None:
    """At the first start of one organisation's process (keysvc/identity/vouched.py): the
    officers its own token vouches for are its configured `initial_officers`, which must be
    enrolled already (the roster is shared)."""
    if not app.vouched.applies or app.vouched.exists():
        return
    files = initial_officer_files(app)
    if not files:
        raise SystemExit(f"a process of the {app.vouched.partition} organisation alone needs "
                         "initial_officers: the officers its own token vouches for")
    roster, cas, vouched = app.roster.current(), client_cas(app), []
    for f in files:
        try:
            officer = officer_from_pem(f.read_bytes(), cas)
        except Exception as exc:
            raise SystemExit(f"initial officer {f}: {getattr(exc, 'message', exc)}") from None
        if roster.officer(officer.fingerprint) is None:
            raise SystemExit(f"initial officer {f} is not enrolled (the roster is shared: "
                             "enrol it first)")
        vouched.append(officer.fingerprint)
    app.vouched.seed(vouched)
    log.info("the %s token vouches for %d officers", app.vouched.partition, len(vouched))


__all__ = ["admit", "seed_roster", "officer_from_pem", "Officer", "Roster", "RosterState"]
