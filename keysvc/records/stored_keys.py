"""Stored device keys (S1SP) and master keys (DCO): key bits wrapped under the partition's
storage key, each row sealed to what it is.

The wrapping alone says nothing about whose key it is: rows swapped between two devices,
copied to a third, or relabelled from AUTHENTICATION to PREPAYMENT still unwrap. So each
row's seal covers the partition (by its token's key and the record kind), the device id,
role and name, the CHF, the file it came from, the storage-key version, the KCV and the
wrapped bytes; every read checks it before the key is used. Rows are written once and never
changed, so they need no anchor: a deleted row is a denial, never a wrong key.
"""
from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from sqlalchemy import Table, and_, bindparam, func, select, text, tuple_
from sqlalchemy.exc import DBAPIError

from keysvc import store as st
from keysvc.errors import error
from keysvc.records.encoding import LENGTH
from keysvc.records.tree_seal import TreeSealer

if TYPE_CHECKING:
    from keysvc.records import Records

INSERT_CHUNK = 5000
_READS: dict[tuple[Table, bool], Any] = {}  # table, by role -> a read of a device's rows


@dataclass(frozen=True)
class StoredKey:
    device_id: str
    role: str
    name: str
    chf_identifier: str
    file_id: str
    key_version: int
    kcv: str
    wrapped: bytes = field(repr=False)


def _batched(items: Iterable, n: int) -> Iterator[tuple]:
    """itertools.batched, which arrives in Python 3.12."""
    it = iter(items)
    while chunk := tuple(itertools.islice(it, n)):
        yield chunk


class _StoredKeys:
    table: Table
    kind: str
    partition: str

    def __init__(self, records: "Records") -> None:
        self.r = records

    def canonical(self, k: StoredKey) -> bytes:
        """`seal.canonical(kind, device, role, name, CHF, file, version, KCV, wrapped)`,
        spelt out: it runs once per stored key on the hot paths."""
        parts = [self.kind.encode(), k.device_id.encode(), k.role.encode(), k.name.encode(),
                 k.chf_identifier.encode(), k.file_id.encode(), str(k.key_version).encode(),
                 k.kcv.encode(), k.wrapped]
        return b"".join([LENGTH(len(b)) + b for b in parts])

    def tree_sealer(self, session: Any) -> TreeSealer[StoredKey]:
        """Seals rows inside an HSM loop (a session retired after use), 16 under one HMAC
        (tree_seal.py)."""
        return TreeSealer(session, self.canonical)

    def sealed(self, keys: list[StoredKey]) -> list[tuple[StoredKey, bytes]]:
        """Each row with its tree seal, made once the rows to store are final. Only rows
        that are stored may share a tree: a member's seal can be rebuilt from any other
        member's seal and its own fields, so a row sealed and then dropped (a certificate
        that fails, a device another file stored first) could be put in by a database
        writer with a seal that verifies."""
        if not keys:
            return []
        token = self.r.partitions.tokens[self.partition]

        def work(sess: Any) -> list[tuple[StoredKey, bytes]]:
            sess.retire_after_use()  # for the session copy of the seal key
            sealer = self.tree_sealer(sess)
            for k in keys:
                sealer.add(k)
            return list(zip(keys, sealer.finish()))
        return token.run(work)

    def row(self, k: StoredKey, seal: bytes, created_at: dt.datetime) -> dict:
        row = self._columns(k)
        row["key_version"], row["seal"], row["created_at"] = k.key_version, seal, created_at
        return row

    def _columns(self, k: StoredKey) -> dict:
        raise NotImplementedError

    def _stored(self, r: Any) -> StoredKey:
        raise NotImplementedError

    def insert_many(self, conn: Any, sealed: Iterable[tuple[StoredKey, bytes]],
                    created_at: dt.datetime) -> None:
        """Each stored key with its seal, in chunks, straight to the driver's executemany.

        In chunks: 140,000 rows' parameters at once cost 160 MB at the peak of a 64 MiB
        file. Straight to the driver: SQLAlchemy's per-row processing (a Binary wrapper
        around every blob, the same timestamp converted for every row) was a fifth of a
        large file's time. The timestamp is converted once, by the column's own type;
        strings, integers and bytes go as they are (sqlite3 and psycopg take bytes as a
        BLOB or bytea)."""
        sealed = list(sealed)
        self._still_primary({k.key_version for k, _ in sealed})
        compiled = self.table.insert().compile(dialect=conn.dialect)
        order = compiled.positiontup  # qmark (SQLite); None for named styles (psycopg)
        created_type = self.table.c.created_at.type
        to_db = created_type.bind_processor(conn.dialect)
        created = to_db(created_at) if to_db else created_at
        for chunk in _batched(sealed, INSERT_CHUNK):
            rows = [self.row(k, seal, created) for k, seal in chunk]
            params = [tuple(r[c] for c in order) for r in rows] if order else rows
            conn.exec_driver_sql(str(compiled), params)

    def get(self, device_id: str, roles: tuple[str, ...] = ()) -> list[StoredKey]:
        """Every stored key of the device (of these roles, if given), each verified; a row
        that fails refuses the whole call."""
        where_ = f"{self.table.name}/{device_id}"
        rows = self.r.fetch(None, self._of_device(bool(roles)), where_, one=False,
                            params={"device_id": device_id, "roles": list(roles)})
        try:
            keys = [self._stored(r) for r in rows]
        except (ValueError, TypeError):
            raise self.r.refuse(None, where_, "is malformed") from None
        ok = self.r.sealers[self.partition].valid_many(
            [(self.canonical(k), r.seal) for k, r in zip(keys, rows)], trees=True)
        for k, good in zip(keys, ok):
            if not good:
                raise self.r.refuse(None, f"{self.table.name}/{k.device_id}/{k.role}/{k.name}",
                                    "fails its HSM seal")
            if k.device_id != device_id or (roles and k.role not in roles):
                # Sealed, but not what was asked for: the read's WHERE is the database's
                # word, and the database is not trusted.
                raise self.r.refuse(None, f"{self.table.name}/{k.device_id}/{k.role}/{k.name}",
                                    f"was returned for {device_id}")
        return keys

    def _of_device(self, by_role: bool) -> Any:
        """The read of a device's rows, built once: each Verify call makes it, and building
        a statement costs SQLAlchemy three times what running a built one does."""
        q = _READS.get((self.table, by_role))
        if q is None:
            c = self.table.c
            q = select(self.table).where(c.device_id == bindparam("device_id"))
            if by_role:
                q = q.where(c.role.in_(bindparam("roles", expanding=True)))
            _READS[(self.table, by_role)] = q
        return q

    def _still_primary(self, used: set[int]) -> None:
        """Rows are written only under the primary storage-key version. A rotation during
        the call (between its wrap and this write) fails the call, which changes nothing and
        can be sent again; otherwise its rows could name a version destroyed meanwhile."""
        if not used:
            return
        from keysvc.custody import versions
        with self.r.partitions.tokens[self.partition].session() as s:
            primary = versions.storage(s)[0]
        if used != {primary}:
            raise error("KEY_ROTATED", "the storage key was rotated during this call: "
                                       "nothing was stored; send the file again")

    # ------------------------------------------------------------------ rewrap
    def _key_columns(self) -> list:
        return [c for c in self.table.primary_key.columns]

    def record_name(self, values: Any) -> str:
        """`<table>/<primary key>`: how a row is named in flags, from a row or a StoredKey
        (one name for both, so that a row flagged once is skipped after)."""
        cols = self._columns(values) if isinstance(values, StoredKey) else None
        return f"{self.table.name}/" + "/".join(
            str(cols[c.name] if cols is not None else getattr(values, c.name))
            for c in self._key_columns())

    def count_by_version(self) -> dict[int, int]:
        """Rows per storage-key version (an index lookup: see migration 0004).

        On PostgreSQL in one process, not a parallel scan: at a million rows that takes
        both cores for tens of ms, and `rewrap status --watch` asks every 2 s while live
        calls run (measured with bench/bench_rewrap.py)."""
        with self.r.store.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SET LOCAL max_parallel_workers_per_gather = 0"))
            rows = conn.execute(select(self.table.c.key_version, func.count())
                                .group_by(self.table.c.key_version)).all()
        out: dict[int, int] = {}
        for v, n in rows:
            if isinstance(v, int):
                out[v] = int(n)
            else:  # SQLite keeps any type: such a row is altered, and opens under no version
                self.r.flag(self.table.name, f"{n} rows name a storage-key version that is "
                                             "not a number")
        return out

    def on_older_versions(self, primary: int, limit: int, skip: frozenset = frozenset(),
                          after: tuple | None = None
                          ) -> tuple[list[StoredKey], list[str], tuple | None]:
        """Up to `limit` rows wrapped under a version older than `primary`, in primary-key
        order after `after`, each verified against its seal; those that fail are returned
        by name (and flagged), not used. `skip`: rows already found bad in this run, left
        for an operator. Also returns the key of the last row read (the next `after`).

        In key order from a cursor, each batch reads on from where the last one stopped:
        an index scan of key_version would, on PostgreSQL, walk past every row already
        moved (their old index entries stay until vacuum) again at each batch."""
        keys = self._key_columns()
        q = select(self.table).where(self.table.c.key_version < primary)
        if after is not None:
            q = q.where(tuple_(*keys) > tuple_(*after))
        q = q.order_by(*keys).limit(limit)
        bad: list[str] = []
        with self.r.store.engine.connect() as conn:
            try:
                rows = conn.execute(q).all()
                last = tuple(getattr(rows[-1], c.name) for c in keys) if rows else None
            except DBAPIError as exc:
                if not st.undecodable(exc):
                    raise
                rows, last = self._readable(conn, q.with_only_columns(*keys), bad)
        good: list[StoredKey] = []
        pairs = []
        for r in rows:
            name = self.record_name(r)
            if name in skip:
                continue
            try:
                pairs.append((name, self._stored(r), r.seal))
            except (ValueError, TypeError):
                bad.append(name)
        ok = self.r.sealers[self.partition].valid_many(
            [(self.canonical(k), seal) for _, k, seal in pairs], trees=True) if pairs else []
        for (name, k, _), fine in zip(pairs, ok):
            if fine:
                good.append(k)
            else:
                bad.append(name)
        for name in bad:
            self.r.flag(name, "fails its HSM seal; not rewrapped")
        return good, bad, last

    def _readable(self, conn: Any, keys_query: Any, bad: list[str]
                  ) -> tuple[list[Any], tuple | None]:
        """A batch holding a row SQLite cannot hand over (text that is not UTF-8): each row
        read on its own, by its key; those that fail are named in `bad` (altered records),
        and the cursor moves past them. A key that cannot be read either stops the job
        here, said as such (the table holds a row no key names)."""
        try:
            key_rows = conn.execute(keys_query).all()
        except DBAPIError as exc:
            if st.undecodable(exc):
                raise error("RECORD_SEAL_INVALID", f"{self.table.name} holds a row whose key "
                                                   "cannot be read; the rewrap stops there")
            raise
        cols = self._key_columns()
        out = []
        for k in key_rows:
            try:
                out.append(conn.execute(select(self.table).where(
                    *[c == getattr(k, c.name) for c in cols])).one())
            except DBAPIError as exc:
                if not st.undecodable(exc):
                    raise
                bad.append(self.record_name(k))
        last = tuple(getattr(key_rows[-1], c.name) for c in cols) if key_rows else None
        return out, last

    def rewrapped(self, conn: Any, changes: list[tuple[StoredKey, StoredKey, bytes]]) -> int:
        """Replace each row by its rewrapped form, only if it is still the row that was
        read (same version and wrapped bytes): a row changed meanwhile is left for the next
        pass. Returns the rows changed."""
        t = self.table
        keys = self._key_columns()
        stmt = t.update().where(and_(*[c == bindparam(f"k_{c.name}") for c in keys],
                                     t.c.key_version == bindparam("old_version"),
                                     t.c.wrapped == bindparam("old_wrapped"))) \
            .values(wrapped=bindparam("new_wrapped"), key_version=bindparam("new_version"),
                    seal=bindparam("new_seal"))
        params = []
        for old, new, seal in changes:
            cols = self._columns(old)
            p = {f"k_{c.name}": cols[c.name] if c.name in cols else getattr(old, c.name)
                 for c in keys}
            p.update(old_version=old.key_version, old_wrapped=old.wrapped,
                     new_wrapped=new.wrapped, new_version=new.key_version, new_seal=seal)
            params.append(p)
        if not params:
            return 0
        return conn.execute(stmt, params).rowcount

    def has_file(self, file_id: str) -> bool:
        """Whether any stored key came from this MigrationFileID (a row whose file id was
        changed is not found here, and is refused by `files_of` when the file's devices
        are checked)."""
        with self.r.store.engine.connect() as conn:
            return conn.execute(select(self.table.c.device_id).where(
                self.table.c.file_id == file_id).limit(1)).first() is not None

    def files_of(self, devices: list[str], *, not_file: str = "") -> dict[str, str]:
        """device -> the MigrationFileID its stored keys came from, each row verified: the
        answer becomes part of a sealed result (DUPLICATE_IDENTIFIER), so a forged row is
        refused rather than believed. A new file's devices usually have no rows at all."""
        out: dict[str, str] = {}
        for i in range(0, len(devices), 500):
            q = select(self.table).where(self.table.c.device_id.in_(devices[i:i + 500]))
            if not_file:
                q = q.where(self.table.c.file_id != not_file)
            rows = self.r.fetch(None, q, self.table.name, one=False)
            if not rows:
                continue
            try:
                keys = [self._stored(r) for r in rows]
            except (ValueError, TypeError):
                raise self.r.refuse(None, self.table.name, "is malformed") from None
            ok = self.r.sealers[self.partition].valid_many(
                [(self.canonical(k), r.seal) for k, r in zip(keys, rows)], trees=True)
            for k, good in zip(keys, ok):
                if not good:
                    raise self.r.refuse(None, f"{self.table.name}/{k.device_id}/{k.role}/"
                                              f"{k.name}", "fails its HSM seal")
                out[k.device_id] = k.file_id
        return out


def _version(value: Any) -> int:
    """A storage-key version as the database holds it: an integer, nothing that only
    converts to one (1.5 would open under version 1's seal yet never match a version-1
    row again)."""
    if type(value) is not int:
        raise TypeError("a key_version that is not an integer")
    return value


def _text(*values: Any) -> None:
    """SQLite keeps whatever type is written: a field of another type is malformed."""
    for v in values:
        if not isinstance(v, str):
            raise TypeError("a text field holds another type")


class DeviceKeys(_StoredKeys):
    table = st.device_keys
    kind = "device-key"
    partition = "s1sp"

    def _columns(self, k: StoredKey) -> dict:
        return {"device_id": k.device_id, "role": k.role, "name": k.name,
                "chf_identifier": k.chf_identifier, "wrapped": k.wrapped, "kcv": k.kcv,
                "file_id": k.file_id}

    def _stored(self, r: Any) -> StoredKey:
        _text(r.device_id, r.role, r.name, r.chf_identifier, r.file_id, r.kcv)
        return StoredKey(r.device_id, r.role, r.name, r.chf_identifier, r.file_id,
                         _version(r.key_version), r.kcv, bytes(r.wrapped))

    def of_device(self, device_id: str, roles: tuple[str, ...] = ()) -> list[StoredKey]:
        return sorted(self.get(device_id, roles), key=lambda k: (k.role, k.name))


class MasterKeys(_StoredKeys):
    table = st.master_keys
    kind = "master-key"
    partition = "dco"
    ROLE, NAME = "MASTER", "MasterKey"

    def _columns(self, k: StoredKey) -> dict:
        return {"device_id": k.device_id, "chf_identifier": k.chf_identifier,
                "wrapped": k.wrapped, "kcv": k.kcv, "file_id": k.file_id}

    def _stored(self, r: Any) -> StoredKey:
        _text(r.device_id, r.chf_identifier, r.file_id, r.kcv)
        return StoredKey(r.device_id, self.ROLE, self.NAME, r.chf_identifier, r.file_id,
                         _version(r.key_version), r.kcv, bytes(r.wrapped))
