"""Rollback certificate escrow (TMAD Clauses 5.1(c) and 15.10.3).

Before an FOC installation migrates, the SMSO deposits the certificates needed to restore
communication if the migration is rolled back, with the inclusive dates of their use. The
S1SP may release them only on those dates, as counted in Great Britain (Europe/London: a
release at 23:30 UTC on 30 June in summer is already 1 July). Each record is sealed with an
HMAC made in the HSM over every field and anchored in the token (keysvc/records/escrows.py
keeps the rows and hands this module only verified ones), so an edit, an older copy put
back, or a deleted record or index row is caught before anything is released.
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from cryptography.hazmat.primitives.serialization import Encoding

from keysvc.app import App, Caller
from keysvc.device_certificate import CertificateParseError, load_certificate
from keysvc.domain import InvalidEUI64, normalise_eui64
from keysvc.errors import error
from keysvc.records.escrows import EscrowTampered

log = logging.getLogger("keysvc.escrow")

LONDON = ZoneInfo("Europe/London")


@dataclass(frozen=True)
class Escrow:
    escrow_id: str
    smso_id: str
    group_id: str
    chf_identifiers: tuple[str, ...]
    certificates: tuple[bytes, ...]
    valid_from: dt.date
    valid_to: dt.date
    max_releases: int      # 0: no limit
    note: str
    releases: int
    revoked: bool
    deposited_by: str
    deposited_at: dt.datetime
    # False: the row no longer matches its HSM seal (altered in the database); it is listed
    # so that officers see it, and never released.
    seal_intact: bool = True


@dataclass(frozen=True)
class Release:
    escrow_id: str
    certificates: tuple[bytes, ...]
    valid_from: dt.date
    valid_to: dt.date
    releases_left: int     # -1: no limit


def london_today(now: dt.datetime) -> dt.date:
    return now.astimezone(LONDON).date()


def end_of_day_london(day: dt.date) -> dt.datetime:
    """The first instant after `day` in London: an inclusive window ends just before it."""
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(0), tzinfo=LONDON)


def anchor_label(app: App, escrow_id: str) -> str:
    return app.records.escrows.anchors().label(escrow_id)


def _escrow(row: dict, seal_intact: bool = True) -> Escrow:
    t = row["deposited_at"]
    return Escrow(row["id"], row["smso_id"], row["group_id"],
                  tuple(json.loads(row["chf_identifiers"])),
                  tuple(base64.b64decode(c) for c in json.loads(row["certificates"])),
                  dt.date.fromisoformat(row["valid_from"]), dt.date.fromisoformat(row["valid_to"]),
                  row["max_releases"], row["note"], row["releases"], bool(row["revoked"]),
                  row["deposited_by"], t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc),
                  seal_intact)


# --------------------------------------------------------------------------- deposit
def deposit(app: App, caller: Caller, *, smso_id: str, group_id: str,
            chf_identifiers: list[str], certificates: list[bytes],
            valid_from: dt.date | None, valid_to: dt.date | None, max_releases: int = 0,
            note: str = "") -> str:
    if valid_from is None or valid_to is None:
        raise error("INVALID_DATE_RANGE", "valid_from and valid_to are required dates")
    if valid_to < valid_from:
        raise error("INVALID_DATE_RANGE", f"valid_to {valid_to} is before valid_from "
                                          f"{valid_from}")
    if valid_to >= dt.date.max:  # its end (midnight after) cannot be represented
        raise error("INVALID_DATE_RANGE", f"valid_to {valid_to} is out of range")
    if not smso_id or not chf_identifiers or not certificates:
        raise error("INVALID_REQUEST", "smso_id, chf_identifiers and certificates are required")
    if max_releases < 0:
        raise error("INVALID_REQUEST", "max_releases cannot be negative")
    try:
        chfs = sorted({normalise_eui64(c) for c in chf_identifiers})
    except InvalidEUI64:
        raise error("INVALID_EUI64", "a CHF identifier is not a well-formed EUI-64") from None
    window_end = end_of_day_london(valid_to)
    ders = []
    for i, raw in enumerate(certificates):
        try:
            cert = load_certificate(raw)
        except CertificateParseError:
            raise error("INVALID_CERTIFICATE", f"certificate {i} does not parse") from None
        # notAfter is inclusive (RFC 5280): 23:59:59 on valid_to covers that whole second
        if cert.not_valid_after_utc < window_end - dt.timedelta(seconds=1):
            raise error("INVALID_CERTIFICATE", f"certificate {i} expires "
                        f"{cert.not_valid_after_utc:%Y-%m-%d}, before valid_to {valid_to}")
        ders.append(base64.b64encode(cert.public_bytes(Encoding.DER)).decode())
    row: dict[str, Any] = {
           "id": "esc-" + uuid.uuid4().hex[:16], "smso_id": smso_id, "group_id": group_id,
           "chf_identifiers": json.dumps(chfs), "certificates": json.dumps(ders),
           "valid_from": valid_from.isoformat(), "valid_to": valid_to.isoformat(),
           "max_releases": int(max_releases), "note": note, "releases": 0, "revoked": False,
           "deposited_by": caller.identity,
           # UTC: SQLite keeps the wall time only, and deposited_at is sealed
           "deposited_at": app.clock().astimezone(dt.timezone.utc)}
    app.records.escrows.insert(row, chfs)
    return row["id"]


# --------------------------------------------------------------------------- release
def release(app: App, caller: Caller, chf_identifier: str, reason: str) -> Release:
    """Release the escrow for a CHF, if today (London) is in its window and it allows."""
    try:
        return _release(app, caller, chf_identifier, reason)
    except EscrowTampered as t:  # audited after the transaction ends, so it cannot be rolled back
        _refuse_tampered(app, caller, t.escrow_id)
        raise AssertionError("unreachable") from None


def _release(app: App, caller: Caller, chf_identifier: str, reason: str) -> Release:
    try:
        chf = normalise_eui64(chf_identifier)
    except InvalidEUI64:
        raise error("INVALID_EUI64", "chf_identifier is not a well-formed EUI-64") from None
    if not reason.strip():
        raise error("INVALID_REQUEST", "a release needs a reason")
    now = app.clock().astimezone(dt.timezone.utc)  # SQLite keeps the wall time only
    today = london_today(now)
    escrows = app.records.escrows
    with escrows.anchors().tx(app.store) as (conn, anchor):
        rows = escrows.for_chf(conn, chf)
        live = [r for r in rows if not r["revoked"]]
        if not live:
            raise error("ESCROW_NOT_FOUND", f"no active escrow for {chf}")
        in_window = [r for r in live if dt.date.fromisoformat(r["valid_from"]) <= today
                     <= dt.date.fromisoformat(r["valid_to"])]
        if not in_window:
            raise error("ESCROW_WINDOW_CLOSED", f"{today} (Europe/London) is outside every "
                                                f"escrow window for {chf}")
        usable = [r for r in in_window
                  if not r["max_releases"] or r["releases"] < r["max_releases"]]
        if not usable:
            raise error("ESCROW_EXHAUSTED", f"the escrow for {chf} has no releases left")
        r = escrows.change(conn, anchor, usable[0], releases=usable[0]["releases"] + 1)
        if not r:  # another writer got there first: never release twice
            raise error("ESCROW_EXHAUSTED", f"the escrow for {chf} changed; retry")
        escrows.add_release(conn, r["id"], caller.identity, reason, now)
    e = _escrow(r)
    left = -1 if not e.max_releases else e.max_releases - e.releases
    return Release(e.escrow_id, e.certificates, e.valid_from, e.valid_to, left)


def _refuse_tampered(app: App, caller: Caller, escrow_id: str) -> None:
    app.audit.append(actor=caller.identity, role=caller.role, action="escrow.seal_invalid",
                     target=escrow_id, outcome="ERROR", code="ESCROW_SEAL_INVALID")
    raise error("ESCROW_SEAL_INVALID", f"escrow {escrow_id} fails its HSM seal: the record "
                                       "was altered; nothing released", escrow_id=escrow_id)


# --------------------------------------------------------------------------- admin
def list_escrows(app: App, smso_id: str = "", chf_identifier: str = "") -> list[Escrow]:
    """Every record, each checked against its seal (`seal_intact`), and every record the
    token anchors but the database lost. A CHF filter finds records through the unsealed
    index and through the anchors (which name their CHFs), so a deleted index row hides
    nothing; a record is listed for a CHF only if its sealed copy names that CHF too."""
    chf = ""
    if chf_identifier:
        try:
            chf = normalise_eui64(chf_identifier)
        except InvalidEUI64:
            raise error("INVALID_EUI64", "chf_identifier is not a well-formed EUI-64") from None
    try:
        rows, lost = app.records.escrows.listing(chf)
    except EscrowTampered:
        app.records.flag("escrows", "a record does not even parse")
        raise error("ESCROW_SEAL_INVALID", "an escrow record was altered in the database so "
                    "that it does not parse; nothing can be listed") from None
    listed = []
    for row, intact in rows:
        if not intact:
            listed.append(_placeholder(str(row["id"]),
                                       app.records.escrows.chfs_anchored(str(row["id"])),
                                       "altered in the database"))
            continue
        if chf and chf not in json.loads(row["chf_identifiers"]):
            continue  # only the index names this CHF
        if smso_id and row["smso_id"] != smso_id:
            continue  # filtered once verified: an altered SMSO hides nothing
        listed.append(_escrow(row, intact))
    # An anchor names the CHFs, not the SMSO: a deleted record is in every listing.
    for eid, chfs in sorted(lost.items()):
        listed.append(_placeholder(eid, chfs, "deleted from the database"))
    return listed


def _placeholder(escrow_id: str, chfs: set[str], what: str) -> Escrow:
    """A record that is altered or gone: listed, from what the token knows (its id and its
    CHFs), so that officers see it; nothing from the database row is trusted or shown."""
    return Escrow(escrow_id, "", "", tuple(sorted(chfs)), (), dt.date.min, dt.date.min, 0,
                  what, 0, False, "", dt.datetime.min.replace(tzinfo=dt.timezone.utc),
                  seal_intact=False)


def revoke(app: App, caller: Caller, escrow_id: str, reason: str = "") -> Escrow:
    try:
        return _revoke(app, escrow_id)
    except EscrowTampered as t:
        _refuse_tampered(app, caller, t.escrow_id)
        raise AssertionError("unreachable") from None


def _revoke(app: App, escrow_id: str) -> Escrow:
    escrows = app.records.escrows
    with escrows.anchors().tx(app.store) as (conn, anchor):
        row = escrows.one_for_update(conn, escrow_id)
        if row is None:
            raise error("ESCROW_NOT_FOUND", f"no escrow {escrow_id!r}")
        row = escrows.change(conn, anchor, row, revoked=True)
        if not row:  # another writer changed it first
            raise error("ESCROW_EXHAUSTED", f"escrow {escrow_id} changed meanwhile; retry")
    return _escrow(row)
