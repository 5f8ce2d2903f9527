"""Escrow records (the `escrows`, `escrow_chfs` and `escrow_releases` tables).

Each record is sealed with an HMAC made in the admin token (`escrow-seal`) over every
field, and its seal is anchored there with a generation, its release count, revocation and
CHFs (keysvc/anchors.py): an edit is caught, an older copy put back is caught (also right
after a crash), a deleted record or CHF index row is found through the anchors, and start-up
rolls a record forward to its newest anchor. The escrow rules (windows, limits) are
keysvc/escrow.py's; this module hands it only verified rows.
"""
from __future__ import annotations

import datetime as dt
import hmac
import json
import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import DBAPIError

from keysvc import store as st
from keysvc.anchors import SEAL_BYTES, Anchors, newest, unpack
from keysvc.anchors import anchored as anchored_seal
from keysvc.custody import versions
from keysvc.custody.versions import MacKeys
from keysvc.domain import eui64_bytes, eui64_from_bytes
from keysvc.hsm import HsmKeyNotFound
from keysvc.hsm import keys as hk
from keysvc.partitions import ESCROW_SEAL_KEY

if TYPE_CHECKING:
    from keysvc.records import Records

log = logging.getLogger("keysvc.records.escrows")
ANCHOR_PREFIX = "escrow-anchor:"
_UNPARSABLE = (ValueError, TypeError, AttributeError, KeyError, OverflowError,
               UnicodeDecodeError)


class _Moved(Exception):
    """A record's anchors changed while start-up waited for its row."""


class EscrowTampered(Exception):
    """A record fails its seal or anchor, does not parse, or was deleted."""

    def __init__(self, escrow_id: str) -> None:
        super().__init__(escrow_id)
        self.escrow_id = escrow_id


def canonical(row: dict) -> bytes:
    fields = {k: row[k] for k in ("id", "smso_id", "group_id", "chf_identifiers",
                                  "certificates", "valid_from", "valid_to", "max_releases",
                                  "note", "releases", "revoked", "deposited_by")}
    fields["revoked"] = bool(fields["revoked"])
    version = _version(row)
    if version != 1:  # inside the seal from version 2 on; records sealed before stay valid
        fields["seal_version"] = version
    t = row["deposited_at"]
    t = t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)
    fields["deposited_at"] = t.astimezone(dt.timezone.utc).isoformat()
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def _version(row: dict) -> int:
    """The escrow-seal version a row names; a value that is no version is an altered row."""
    v = row.get("seal_version", 1)
    if v is None:
        return 1
    if type(v) is not int or v < 1:
        raise ValueError("seal_version is not a version")
    return v


def payload(row: dict) -> bytes:
    """What an escrow anchor carries after the seal: the release count and whether it is
    revoked (so that start-up can roll the database forward to the token's newest state),
    then the record's CHFs, 8 bytes each (so that a record, or its CHF index row, deleted
    from the database is still known to the token, and found)."""
    return (int(row["releases"]).to_bytes(4, "big") + (b"\1" if row["revoked"] else b"\0")
            + b"".join(eui64_bytes(c) for c in json.loads(row["chf_identifiers"])))


def anchor_chfs(value: bytes) -> set[str]:
    rest = unpack(value).payload[5:]
    return {eui64_from_bytes(rest[i:i + 8]) for i in range(0, len(rest) - 7, 8)}


def missing_records(anchored: dict[str, list[bytes]], present: set[str], chf: str = ""
                    ) -> dict[str, set[str]]:
    """Anchored records (naming `chf`, if given) that the database does not show:
    escrow id -> the CHFs its anchor names."""
    out: dict[str, set[str]] = {}
    for eid, values in anchored.items():
        if eid in present:
            continue
        chfs = set().union(*(anchor_chfs(v) for v in values))
        if not chf or chf in chfs:
            out[eid] = chfs
    return out


class Escrows:
    def __init__(self, records: "Records") -> None:
        self.r = records

    # ------------------------------------------------------------------ seals and anchors
    def anchors(self) -> Anchors:
        """This database's escrow anchors in the admin token."""
        return Anchors(self.r.partitions.admin, f"{ANCHOR_PREFIX}{self.r.instance}:")

    def seal(self, row: dict) -> bytes:
        """The seal of `row` under the version it names (HsmKeyNotFound: a version the
        token does not hold, even read again)."""
        version = _version(row)
        versions.see(self.r.partitions.admin, ESCROW_SEAL_KEY, version)  # another process's
        with self.r.partitions.admin.session() as s:
            return MacKeys(s, ESCROW_SEAL_KEY).mac(canonical(row), version)

    def sealed(self, row: dict) -> dict:
        """`row` named and sealed under the primary escrow-seal version (every write)."""
        with self.r.partitions.admin.session() as s:
            keys = MacKeys(s, ESCROW_SEAL_KEY)
            new = {**row, "seal_version": keys.primary}
            return {**new, "seal": keys.mac(canonical(new))}

    def intact(self, row: dict, anchored: dict[str, list[bytes]] | None = None) -> bool:
        """The seal is valid for this content and is the record's newest anchored one.
        `anchored`: every anchor, read once for a whole listing (`Anchors.all`). A row
        whose fields are not even of their types is not intact either."""
        try:
            seal = bytes(row["seal"])
            if not hmac.compare_digest(self.seal(row), seal):
                return False
        except (*_UNPARSABLE, HsmKeyNotFound):  # a version the token does not hold
            return False
        if anchored is not None:
            return anchored_seal(anchored.get(row["id"], []), seal)
        return self.anchors().holds(row["id"], seal)

    def rows(self, conn: Any, query: Any, where: str) -> list[dict]:
        """Rows as dicts; a value the database cannot hand over as its type is an altered
        record (for a listing, the listing)."""
        try:
            return [dict(r._mapping) for r in conn.execute(query)]
        except _UNPARSABLE:
            raise EscrowTampered(where) from None
        except DBAPIError as exc:
            if st.undecodable(exc):
                raise EscrowTampered(where) from None
            raise

    # ------------------------------------------------------------------ reads
    def for_chf(self, conn: Any, chf: str) -> list[dict]:
        """Every record naming this CHF, locked and verified, newest deposit first. The
        token knows every record that names it: one the index or the table lost is found
        (the table: refused; the index: found all the same, and audited)."""
        ids = [r.escrow_id for r in conn.execute(
            select(st.escrow_chfs.c.escrow_id).where(st.escrow_chfs.c.chf_identifier == chf))]
        anchored = self.anchors().all()
        unindexed = [e for e in missing_records(anchored, set(), chf) if e not in ids]
        ids += unindexed
        rows = self.rows(conn, select(st.escrows).where(st.escrows.c.id.in_(ids))
                         .order_by(st.escrows.c.deposited_at.desc()).with_for_update(),
                         ids[0]) if ids else []
        missing = sorted(set(ids) - {r["id"] for r in rows})
        if missing:
            raise EscrowTampered(missing[0])
        for eid in unindexed:
            self.r.flag(f"escrow_chfs/{eid}", f"the CHF index lost {chf}", conn)
        for r in rows:
            # escrow_chfs is an unsealed index: the CHF must be in the sealed record too
            if not self.intact(r) or chf not in json.loads(r["chf_identifiers"]):
                raise EscrowTampered(r["id"])
        return rows

    def one_for_update(self, conn: Any, escrow_id: str) -> dict | None:
        found = self.rows(conn, select(st.escrows).where(st.escrows.c.id == escrow_id)
                          .with_for_update(), escrow_id)
        if not found:
            return None
        if not self.intact(found[0]):
            raise EscrowTampered(escrow_id)
        return found[0]

    def listing(self, chf: str = "") -> tuple[list[tuple[dict, bool]], dict[str, set[str]]]:
        """(row, intact) of every record (naming `chf`, through the index or the
        anchors), and the anchored records the database lost (id -> CHFs)."""
        anchored = self.anchors().all()
        q = select(st.escrows).order_by(st.escrows.c.deposited_at)
        if chf:
            by_anchor = list(missing_records(anchored, set(), chf))
            q = q.where(st.escrows.c.id.in_(select(st.escrow_chfs.c.escrow_id).where(
                st.escrow_chfs.c.chf_identifier == chf)) | st.escrows.c.id.in_(by_anchor))
        with self.r.store.engine.connect() as conn:
            rows = self.rows(conn, q, "escrows")
            present = {r.id for r in conn.execute(select(st.escrows.c.id))}
        out = []
        for row in rows:
            ok = self.intact(row, anchored)
            if not ok:
                self.r.flag(f"escrows/{row['id']}", "fails its HSM seal or anchor")
            out.append((row, ok))
        lost = missing_records(anchored, present, chf)
        for eid in sorted(lost):
            self.r.flag(f"escrows/{eid}", "was deleted from the database")
        return out, lost

    def chfs_anchored(self, escrow_id: str) -> set[str]:
        with self.r.partitions.admin.session() as s:
            values = hk.data_values(s, self.anchors().label(escrow_id))
        return set().union(*(anchor_chfs(v) for v in values))

    # ------------------------------------------------------------------ writes
    def insert(self, row: dict, chfs: list[str]) -> None:
        row.update(self.sealed(row))
        with self.anchors().tx(self.r.store) as (conn, anchor):
            conn.execute(st.escrows.insert().values(**row))
            conn.execute(st.escrow_chfs.insert(), [{"escrow_id": row["id"],
                                                    "chf_identifier": c} for c in chfs])
            anchor(row["id"], row["seal"], None, payload(row))

    def change(self, conn: Any, anchor: Any, row: dict, **changes: Any) -> dict:
        """Releases or revocation of a row read verified and locked in this transaction;
        returns the new row. Compare-and-set on the release count: never release twice."""
        old_seal = bytes(row["seal"])
        new = self.sealed({**row, **changes})
        changed = conn.execute(update(st.escrows).where(
            st.escrows.c.id == row["id"], st.escrows.c.releases == row["releases"],
            st.escrows.c.seal == old_seal)
            .values(**changes, seal=new["seal"], seal_version=new["seal_version"])).rowcount
        if changed != 1:
            return {}
        anchor(row["id"], new["seal"], old_seal, payload(new))
        return new

    def count_by_version(self) -> dict[int, int]:
        """Escrow records by the escrow-seal version they name (the database's word)."""
        with self.r.store.engine.connect() as conn:
            return {int(v): int(n) for v, n in conn.execute(
                select(st.escrows.c.seal_version, func.count()).group_by(
                    st.escrows.c.seal_version)) if isinstance(v, int)}

    def not_on(self, primary: int) -> set[str]:
        """Records the token anchors whose row is missing, altered, or not sealed under
        `primary`: while there is one, no older escrow-seal version may be destroyed (the
        anchors are the token's word on which records exist; a row count is not)."""
        anchored = self.anchors().all()
        try:
            with self.r.store.engine.connect() as conn:
                rows = {r["id"]: r for r in self.rows(conn, select(st.escrows), "escrows")}
        except EscrowTampered:
            return set(anchored) or {"escrows"}
        out = set()
        for eid, values in anchored.items():
            row = rows.get(eid)
            try:
                ok = row is not None and _version(row) == primary \
                    and self.intact(row, {eid: values})
            except Exception:
                ok = False
            if not ok:
                out.add(eid)
        return out

    def not_on_primary(self, primary: int, after: str, limit: int = 100) -> list[str]:
        """Ids of rows naming another version than `primary`, in id order after `after`
        (EscrowTampered: an id that cannot even be read)."""
        with self.r.store.engine.connect() as conn:
            try:
                return [r.id for r in conn.execute(
                    select(st.escrows.c.id).where(st.escrows.c.seal_version != primary,
                                                  st.escrows.c.id > after)
                    .order_by(st.escrows.c.id).limit(limit))]
            except DBAPIError as exc:
                if st.undecodable(exc):
                    raise EscrowTampered("escrows") from None
                raise

    def reseal(self, escrow_id: str, primary: int) -> bool:
        """Seal a record again under the primary escrow-seal version, its anchor moved on
        with it (the rewrap job, after a rotation). A record that fails its seal or anchor
        raises EscrowTampered and is left as it is."""
        with self.anchors().tx(self.r.store) as (conn, anchor):
            row = self.one_for_update(conn, escrow_id)
            if row is None or _version(row) == primary:
                return False
            return bool(self.change(conn, anchor, row))

    def add_release(self, conn: Any, escrow_id: str, actor: str, reason: str,
                    time: dt.datetime) -> None:
        conn.execute(st.escrow_releases.insert().values(
            escrow_id=escrow_id, actor=actor, reason=reason[:1000], time=time))

    # ------------------------------------------------------------------ start-up
    def roll_forward(self) -> int:
        """A record whose row is not the token's newest anchor (a crash between a change's
        anchor and its commit, or an older copy put back) takes the release count and
        revocation that anchor holds, if the record so changed seals to it. A record whose
        row is gone stays gone (and is found by releases and listings)."""
        anchors = self.anchors()
        n = 0
        try:
            with self.r.store.engine.connect() as conn:
                rows = {r["id"]: r for r in self.rows(conn, select(st.escrows), "escrows")}
        except EscrowTampered:
            log.error("escrow records that do not even parse were not rolled forward")
            return 0
        for eid, values in anchors.all().items():
            try:
                n += self._roll_forward_one(anchors, eid, values, rows.get(eid))
            except _Moved:
                continue  # decided elsewhere meanwhile: the next start looks again
            except Exception as exc:  # one record never stops the start
                self.r.flag(f"escrows/{eid}", f"not rolled forward ({type(exc).__name__})")
        return n

    def _roll_forward_one(self, anchors: Anchors, eid: str, values: list[bytes],
                          row: dict | None) -> int:
        top = newest(values)
        if len(top) != 1 or row is None:
            return 0
        a = top[0]
        n = 0
        if not self.intact(row, {eid: values}):
            moved = {**row, "releases": int.from_bytes(a.payload[:4], "big"),
                     "revoked": a.payload[4:5] == b"\1"}
            # under the row's version, or another (a crash amid a re-seal to the primary)
            with self.r.partitions.admin.session() as s:
                held = versions.versions(s, ESCROW_SEAL_KEY)
            for v in held:
                moved["seal_version"] = v
                try:
                    if hmac.compare_digest(self.seal(moved), a.seal):
                        break
                except (*_UNPARSABLE, HsmKeyNotFound):
                    continue
            else:
                return 0
            with self.r.audited("record.rolled_forward", f"escrows/{eid}: releases "
                                f"{moved['releases']}, revoked {moved['revoked']}, rolled "
                                "forward to the token's newest anchor"):
                with self.r.store.tx() as conn:
                    conn.execute(update(st.escrows).where(st.escrows.c.id == eid).values(
                        releases=moved["releases"], revoked=moved["revoked"], seal=a.seal,
                        seal_version=moved["seal_version"]))
                    if anchors.newest(eid) != [a]:  # a release elsewhere decided it meanwhile
                        raise _Moved()
            log.warning("escrow %s rolled forward to the token's newest anchor", eid)
            n = 1
        if len(values) > 1:
            anchors.settle(eid, next(v for v in values if unpack(v) == a))
        return n

    def reanchor_legacy(self) -> int:
        """Once, at the upgrade to sealed records (`keysvc.records.upgrade`): records
        anchored under the old label (or, deposited before anchors existed, not at all) get
        this database's anchor."""
        try:
            with self.r.store.engine.connect() as conn:
                rows = self.rows(conn, select(st.escrows), "escrows")
        except EscrowTampered:
            log.error("upgrade: escrow records that do not even parse were not anchored")
            rows = []
        anchors = self.anchors()
        anchored = anchors.all() if rows else {}
        with self.r.partitions.admin.session() as s:
            old = hk.data_by_label(s, ANCHOR_PREFIX)
        moved = {}
        for r in rows:
            try:
                if r["id"] in anchored or not hmac.compare_digest(self.seal(r),
                                                                  bytes(r["seal"])):
                    continue
            except (*_UNPARSABLE, HsmKeyNotFound):
                continue
            legacy = old.get(f"{ANCHOR_PREFIX}{r['id']}")
            if legacy is None or any(hmac.compare_digest(v[:SEAL_BYTES], bytes(r["seal"]))
                                     for v in legacy):
                moved[r["id"]] = (bytes(r["seal"]), payload(r))
        if moved:
            anchors.add(moved)
            with self.r.partitions.admin.session() as s:
                for eid in moved:
                    hk.destroy_data(s, f"{ANCHOR_PREFIX}{eid}")
            log.warning("anchored %d escrow records under this database's anchors",
                        len(moved))
        return len(moved)
