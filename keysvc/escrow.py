"""Rollback certificate escrow (TMAD Clauses 5.1(c) and 15.10.3).

Before an FOC installation migrates, the SMSO deposits the certificates needed to restore
communication if the migration is rolled back, with the inclusive dates of their use. The
S1SP may release them only on those dates, as counted in Great Britain (Europe/London: a
release at 23:30 UTC on 30 June in summer is already 1 July). Each record is sealed with an
HMAC made in the HSM over every field, so an edit in the database is caught on release,
and the seal is anchored in the token (keysvc/anchors.py), so an older sealed copy put
back in the database is caught too.
"""
from __future__ import annotations

import base64
import datetime as dt
import hmac
import json
import logging
import uuid
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import select, update

from hsm import keys as hk
from keysvc import store as st
from keysvc.anchors import SEAL_BYTES, Anchors, newest, unpack
from keysvc.anchors import anchored as anchored_seal
from keysvc.app import App, Caller
from keysvc.device_certificate import CertificateParseError, load_certificate
from keysvc.domain import InvalidEUI64, eui64_bytes, eui64_from_bytes, normalise_eui64
from keysvc.errors import error
from keysvc.partitions import ESCROW_SEAL_KEY

log = logging.getLogger("keysvc.escrow")
ANCHOR_PREFIX = "escrow-anchor:"

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


def _canonical(row: dict) -> bytes:
    fields = {k: row[k] for k in ("id", "smso_id", "group_id", "chf_identifiers",
                                  "certificates", "valid_from", "valid_to", "max_releases",
                                  "note", "releases", "revoked", "deposited_by")}
    fields["revoked"] = bool(fields["revoked"])
    t = row["deposited_at"]
    t = t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)
    fields["deposited_at"] = t.astimezone(dt.timezone.utc).isoformat()
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def _seal(app: App, row: dict) -> bytes:
    with app.partitions.admin.session() as s:
        return hk.hmac_sha256(hk.find_key(s, ESCROW_SEAL_KEY), _canonical(row))


def _anchors(app: App) -> Anchors:
    """This database's escrow anchors in the admin token."""
    return Anchors(app.partitions.admin, f"{ANCHOR_PREFIX}{app.records.instance}:")


def anchor_label(app: App, escrow_id: str) -> str:
    return _anchors(app).label(escrow_id)


def _payload(row: dict) -> bytes:
    """What an escrow anchor carries after the seal: the release count and whether it is
    revoked (so that start-up can roll the database forward to the token's newest state),
    then the record's CHFs, 8 bytes each (so that a record, or its CHF index row, deleted
    from the database is still known to the token, and found)."""
    return (int(row["releases"]).to_bytes(4, "big") + (b"\1" if row["revoked"] else b"\0")
            + b"".join(eui64_bytes(c) for c in json.loads(row["chf_identifiers"])))


def _anchor_chfs(value: bytes) -> set[str]:
    rest = unpack(value).payload[5:]
    return {eui64_from_bytes(rest[i:i + 8]) for i in range(0, len(rest) - 7, 8)}


def _sealed_ok(app: App, row: dict, anchored: dict[str, list[bytes]] | None = None) -> bool:
    """The seal is valid for this content and is the record's current one (the newest
    anchored). `anchored`: every anchor, read once for a whole listing (`Anchors.all`).
    A row whose fields are not even of their types is not intact either."""
    try:
        seal = bytes(row["seal"])
        if not hmac.compare_digest(_seal(app, row), seal):
            return False
    except (ValueError, TypeError, AttributeError, KeyError):
        return False
    if anchored is not None:
        return anchored_seal(anchored.get(row["id"], []), seal)
    return _anchors(app).holds(row["id"], seal)


def roll_forward(app: App) -> int:
    """At start: a record whose row is not the token's newest anchor (a crash between a
    change's anchor and its commit, or an older copy put back) takes the release count and
    revocation that anchor holds, if the record so changed seals to it. A record whose row
    is gone stays gone (and is found by releases and listings)."""
    anchors = _anchors(app)
    n = 0
    with app.store.engine.connect() as conn:
        rows = {r["id"]: r for r in _rows(conn, select(st.escrows), "escrows")}
    for eid, values in anchors.all().items():
        top = newest(values)
        row = rows.get(eid)
        if len(top) != 1 or row is None:
            continue
        a = top[0]
        if not _sealed_ok(app, row, {eid: values}):
            moved = {**row, "releases": int.from_bytes(a.payload[:4], "big"),
                     "revoked": a.payload[4:5] == b"\1"}
            try:
                ok = hmac.compare_digest(_seal(app, moved), a.seal)
            except (ValueError, TypeError, AttributeError, KeyError):
                ok = False
            if not ok:
                continue
            with app.store.tx() as conn:
                conn.execute(update(st.escrows).where(st.escrows.c.id == eid).values(
                    releases=moved["releases"], revoked=moved["revoked"], seal=a.seal))
            app.records.flag(f"escrows/{eid}", "rolled forward to the token's newest anchor")
            n += 1
        if len(values) > 1:
            anchors.settle(eid, next(v for v in values if unpack(v) == a))
    return n


def _rows(conn, query, where: str) -> list[dict]:
    """Rows as dicts; a value the database cannot hand over as its type makes the record
    (all of them, for a listing) refused as altered."""
    try:
        return [dict(r._mapping) for r in conn.execute(query)]
    except (ValueError, TypeError, OverflowError, UnicodeDecodeError):
        raise _Tampered(where) from None


def _missing_records(anchored: dict[str, list[bytes]], present: set[str], chf: str = ""
                     ) -> dict[str, set[str]]:
    """Anchored records (naming `chf`, if given) that the database no longer shows:
    escrow id -> the CHFs its anchor names."""
    out: dict[str, set[str]] = {}
    for eid, values in anchored.items():
        if eid in present:
            continue
        chfs = set().union(*(_anchor_chfs(v) for v in values))
        if not chf or chf in chfs:
            out[eid] = chfs
    return out


def reanchor_legacy(app: App) -> int:
    """Once, at the upgrade to sealed records (`keysvc.records.upgrade`): escrow records
    anchored under the old label (or, deposited before anchors existed, not at all) get
    this database's anchor, which also names their CHFs."""
    try:
        with app.store.engine.connect() as conn:
            rows = _rows(conn, select(st.escrows), "escrows")
    except _Tampered:
        log.error("upgrade: escrow records that do not even parse were not anchored")
        rows = []
    anchors = _anchors(app)
    anchored = anchors.all() if rows else {}
    with app.partitions.admin.session() as s:
        old = hk.data_by_label(s, ANCHOR_PREFIX)
    moved = {}
    for r in rows:
        if r["id"] in anchored or not hmac.compare_digest(_seal(app, r), bytes(r["seal"])):
            continue
        legacy = old.get(f"{ANCHOR_PREFIX}{r['id']}")
        if legacy is None or any(hmac.compare_digest(v[:SEAL_BYTES], bytes(r["seal"]))
                                 for v in legacy):
            moved[r["id"]] = (bytes(r["seal"]), _payload(r))
    if moved:
        anchors.add(moved)
        with app.partitions.admin.session() as s:
            for eid in moved:
                hk.destroy_data(s, f"{ANCHOR_PREFIX}{eid}")
        log.warning("anchored %d escrow records under this database's anchors", len(moved))
    return len(moved)


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
    row = {"id": "esc-" + uuid.uuid4().hex[:16], "smso_id": smso_id, "group_id": group_id,
           "chf_identifiers": json.dumps(chfs), "certificates": json.dumps(ders),
           "valid_from": valid_from.isoformat(), "valid_to": valid_to.isoformat(),
           "max_releases": int(max_releases), "note": note, "releases": 0, "revoked": False,
           "deposited_by": caller.identity,
           # UTC: SQLite keeps the wall time only, and deposited_at is sealed
           "deposited_at": app.clock().astimezone(dt.timezone.utc)}
    row["seal"] = _seal(app, row)
    with _anchors(app).tx(app.store) as (conn, anchor):
        conn.execute(st.escrows.insert().values(**row))
        conn.execute(st.escrow_chfs.insert(), [{"escrow_id": row["id"], "chf_identifier": c}
                                               for c in chfs])
        anchor(row["id"], row["seal"], None, _payload(row))
    return row["id"]


# --------------------------------------------------------------------------- release
class _Tampered(Exception):
    def __init__(self, escrow_id: str) -> None:
        self.escrow_id = escrow_id


def release(app: App, caller: Caller, chf_identifier: str, reason: str) -> Release:
    """Release the escrow for a CHF, if today (London) is in its window and it allows."""
    try:
        return _release(app, caller, chf_identifier, reason)
    except _Tampered as t:  # audited after the transaction ends, so it cannot be rolled back
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
    anchors = _anchors(app)
    with anchors.tx(app.store) as (conn, anchor):
        ids = [r.escrow_id for r in conn.execute(
            select(st.escrow_chfs.c.escrow_id).where(st.escrow_chfs.c.chf_identifier == chf))]
        # The token knows every record that names this CHF: one the index or the table no
        # longer shows was deleted, and nothing is released until an officer looks.
        anchored = anchors.all()
        unindexed = [e for e in _missing_records(anchored, set(), chf) if e not in ids]
        ids += unindexed
        rows = _rows(conn, select(st.escrows).where(st.escrows.c.id.in_(ids))
                     .order_by(st.escrows.c.deposited_at.desc()).with_for_update(),
                     ids[0]) if ids else []
        missing = sorted(set(ids) - {r["id"] for r in rows})
        if missing:
            raise _Tampered(missing[0])
        for eid in unindexed:  # the sealed record is found all the same; the gap is noted
            app.records.flag(f"escrow_chfs/{eid}", f"the CHF index lost {chf}", conn)
        for r in rows:
            # escrow_chfs is an unsealed index: the CHF must be in the sealed record too
            if not _sealed_ok(app, r) or chf not in json.loads(r["chf_identifiers"]):
                raise _Tampered(r["id"])
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
        r = usable[0]
        old_seal = bytes(r["seal"])
        r["releases"] += 1
        r["seal"] = _seal(app, r)
        changed = conn.execute(update(st.escrows).where(
            st.escrows.c.id == r["id"], st.escrows.c.releases == r["releases"] - 1)
            .values(releases=r["releases"], seal=r["seal"])).rowcount
        if changed != 1:  # another writer got there first: never release twice
            raise error("ESCROW_EXHAUSTED", f"the escrow for {chf} changed; retry")
        anchor(r["id"], r["seal"], old_seal, _payload(r))
        conn.execute(st.escrow_releases.insert().values(
            escrow_id=r["id"], actor=caller.identity, reason=reason[:1000], time=now))
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
    q = select(st.escrows).order_by(st.escrows.c.deposited_at)
    anchored = _anchors(app).all()
    if chf_identifier:
        try:
            chf = normalise_eui64(chf_identifier)
        except InvalidEUI64:
            raise error("INVALID_EUI64", "chf_identifier is not a well-formed EUI-64") from None
        by_anchor = list(_missing_records(anchored, set(), chf))
        q = q.where(st.escrows.c.id.in_(select(st.escrow_chfs.c.escrow_id).where(
            st.escrow_chfs.c.chf_identifier == chf)) | st.escrows.c.id.in_(by_anchor))
    try:
        with app.store.engine.connect() as conn:
            rows = _rows(conn, q, "escrows")
            present = {r.id for r in conn.execute(select(st.escrows.c.id))}
    except _Tampered:
        app.records.flag("escrows", "a record does not even parse")
        raise error("ESCROW_SEAL_INVALID", "an escrow record was altered in the database so "
                    "that it does not parse; nothing can be listed") from None
    listed = []
    for row in rows:
        intact = _sealed_ok(app, row, anchored)
        if not intact:
            app.records.flag(f"escrows/{row['id']}", "fails its HSM seal or anchor")
            chfs = set().union(*(_anchor_chfs(v) for v in anchored.get(row["id"], [])))
            listed.append(_placeholder(str(row["id"]), chfs, "altered in the database"))
            continue
        if chf and chf not in json.loads(row["chf_identifiers"]):
            continue  # only the index names this CHF
        if smso_id and row["smso_id"] != smso_id:
            continue  # filtered once verified: an altered SMSO hides nothing
        listed.append(_escrow(row, intact))
    # An anchor names the CHFs, not the SMSO: a deleted record is in every listing.
    for eid, chfs in sorted(_missing_records(anchored, present, chf).items()):
        app.records.flag(f"escrows/{eid}", "was deleted from the database")
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
    except _Tampered as t:
        _refuse_tampered(app, caller, t.escrow_id)
        raise AssertionError("unreachable") from None


def _revoke(app: App, escrow_id: str) -> Escrow:
    with _anchors(app).tx(app.store) as (conn, anchor):
        found = _rows(conn, select(st.escrows).where(st.escrows.c.id == escrow_id)
                      .with_for_update(), escrow_id)
        if not found:
            raise error("ESCROW_NOT_FOUND", f"no escrow {escrow_id!r}")
        row = found[0]
        if not _sealed_ok(app, row):
            raise _Tampered(escrow_id)
        old_seal = bytes(row["seal"])
        row["revoked"] = True
        row["seal"] = _seal(app, row)
        conn.execute(update(st.escrows).where(st.escrows.c.id == escrow_id)
                     .values(revoked=True, seal=row["seal"]))
        anchor(escrow_id, row["seal"], old_seal, _payload(row))
    return _escrow(row)
