"""Sealed records: the only code that reads or writes the security-relevant tables.

The database is untrusted storage (README, threat model). Every record that decides which
key a device has, what a key may do, who approved what, or what a file's result was is
sealed on write with an HMAC made in the HSM (`seal.py`) and checked on every read; the
records that change state (keys, operations) also have their current seal anchored in the
token (`keysvc/anchors.py`), so an older sealed copy put back is refused too. Domain code
gets verified dataclasses from here, never rows.

A record that fails is refused with RECORD_SEAL_INVALID and an audit event
(`record.seal_invalid`, written after the refused transaction has rolled back).
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Callable

from sqlalchemy import select

from keysvc import store as st
from keysvc.anchors import Anchors
from keysvc.errors import KeysvcError, error
from keysvc.records.seal import Sealer

log = logging.getLogger("keysvc.records")

# Which partition's token seals records of each service (S1SP records never need the DCO
# token, and the reverse: each organisation's records are sealed by its own partition).
# The admin partition seals the operations that enrol and remove officers or deny keys.
SEALING_PARTITIONS = ("s1sp", "dco", "admin")

OnTamper = Callable[[str, str], None]   # (record, what is wrong)


def holds_records_of(store: st.Store, partition: str) -> bool:
    """Whether the database holds anything sealed, wrapped or MACed by `partition`'s
    token: a new token beside it could never read it (App.open refuses that pairing)."""
    mine = {"s1sp": [st.device_keys], "dco": [st.master_keys],
            "admin": [st.audit_events, st.escrows]}[partition]
    with store.engine.connect() as conn:
        if any(conn.execute(select(t).limit(1)).first() for t in mine):
            return True
        return any(conn.execute(select(t).where(column == partition).limit(1)).first()
                   for t, column in ((st.keys, st.keys.c.partition),
                                     (st.operations, st.operations.c.partition),
                                     (st.import_jobs, st.import_jobs.c.partition),
                                     (st.migration_files, st.migration_files.c.service)))


class Records:
    """The repositories, sharing one store, the partitions' sealers and anchors."""

    def __init__(self, store: st.Store, partitions: Any, on_tamper: OnTamper | None = None
                 ) -> None:
        from keysvc.records.escrows import Escrows
        from keysvc.records.files import Files
        from keysvc.records.import_jobs import ImportJobs
        from keysvc.records.keys import Keys
        from keysvc.records.operations import Operations
        from keysvc.records.stored_keys import DeviceKeys, MasterKeys
        self.store = store
        self.partitions = partitions
        self.on_tamper = on_tamper or (lambda record, why: None)
        # `with records.audited(action, target):` around a transaction that is an effect of
        # keysvc's own (a start-up roll-forward): its audit event commits with it. The App
        # sets it; without one (tools, some tests) it is a no-op.
        self.audited: Callable[[str, str], Any] = lambda action, target: nullcontext()
        # Only the served partitions' (keysvc/partitions.py Served): a record of another
        # partition is that partition's process's to check, never flagged here.
        from keysvc.partitions import Served
        self.sealers = Served({p: Sealer(partitions.tokens[p]) for p in SEALING_PARTITIONS
                               if p in partitions.tokens})
        self._instance = ""
        self.keys = Keys(self)
        self.operations = Operations(self)
        self.import_jobs = ImportJobs(self)
        self.device_keys = DeviceKeys(self)
        self.master_keys = MasterKeys(self)
        self.files = Files(self)
        self.escrows = Escrows(self)

    @property
    def instance(self) -> str:
        """This database's identity (the `instance` row), read once."""
        if not self._instance:
            with self.store.engine.connect() as conn:
                self._instance = conn.execute(
                    select(st.instance.c.instance_id).where(st.instance.c.id == 1)
                ).scalar() or "none"
        return self._instance

    def ensure_instance(self, *, dev: bool) -> None:
        """At start: the database's instance id must be one the token set serves.

        Anchors are labelled with it, so a database whose id was changed would find none
        of its anchors (deleted escrow records would go unseen). The first start registers
        the id in the admin token; later an unknown id refuses the start. A development
        set-up may serve a new, empty database (`make run` after deleting keysvc.db)."""
        from keysvc.hsm import keys as hk
        label = "keysvc-instance"
        mine = self.instance
        with self.partitions.admin.session() as s:
            known = {v.decode(errors="replace") for v in hk.data_values(s, label)}
        if mine in known:
            return
        if mine == "none" or (known and not (dev and self._empty())):
            raise SystemExit(f"the database's instance id {mine!r} is not one this token set "
                             f"serves ({', '.join(sorted(known))}): a database from "
                             "elsewhere, or altered; refusing to start")
        with self.partitions.admin.session() as s:
            hk.put_data(s, label, mine.encode())
        log.info("token set now serves database instance %s", mine)

    def _empty(self) -> bool:
        with self.store.engine.connect() as conn:
            return not any(conn.execute(select(t).limit(1)).first() for t in (
                st.keys, st.operations, st.import_jobs, st.migration_files, st.escrows,
                st.audit_events))

    def serves(self, partition: str) -> bool:
        """Whether this process checks `partition`'s records (it holds its token)."""
        return partition in self.sealers

    def elsewhere(self, partition: str, record_id: str = "",
                  anchored: dict[str, dict[str, list[bytes]]] | None = None) -> bool:
        """A record of a partition this process does not serve: the other organisation's
        process checks it. Not elsewhere, but altered (refused or flagged here like any
        other): a partition that is no partition at all, and a record that a served token
        anchors (`record_id`, e.g. "key/NAME": a row of ours moved to the other partition).
        `anchored`: the served partitions' anchors, when a listing has read them all."""
        if partition not in SEALING_PARTITIONS or partition in self.sealers:
            return False
        for served in self.sealers:
            if not record_id:
                break
            held = (anchored.get(served, {}).get(record_id) if anchored is not None
                    else self.anchors(served).newest(record_id))
            if held:
                return False
        return True

    def served_sealer(self, partition: str, record_id: str = "") -> Sealer | None:
        """The partition's sealer; None for a record altered as `elsewhere` says (the
        caller refuses it); PARTITION_NOT_SERVED for another process's record."""
        if self.elsewhere(partition, record_id):
            return self.sealers[partition]  # raises PARTITION_NOT_SERVED
        return self.sealers.get(partition)

    def anchors(self, partition: str) -> Anchors:
        """Current seals of this database's changing records, in the partition's token."""
        return Anchors(self.partitions.tokens[partition], f"rec:{self.instance}:")

    def fetch(self, conn: Any, query: Any, record: str, *, one: bool = True,
              params: dict | None = None) -> Any:
        """Run a read; a value the database cannot even hand over as its type (a date
        that is not a date, say) is a malformed record, refused like an altered one."""
        def run(c: Any) -> Any:
            try:
                result = c.execute(query, params)
                return result.first() if one else result.all()
            except (ValueError, TypeError, OverflowError, UnicodeDecodeError):
                raise self.refuse(conn, record, "is malformed") from None
        if conn is None:
            with self.store.engine.connect() as c:
                return run(c)
        return run(conn)

    def fetch_each(self, table: Any, key: Any, order: Any) -> list[tuple[Any, Any]]:
        """(key value, row or None) for every row of a listing. Rows come in one read; if
        a value does not even convert to its type, one by one, so that only that record
        is shown as altered (None) and the listing still works."""
        try:
            with self.store.engine.connect() as conn:
                return [(getattr(r, key.name), r) for r in
                        conn.execute(select(table).order_by(order)).all()]
        except (ValueError, TypeError, OverflowError, UnicodeDecodeError):
            pass
        out = []
        with self.store.engine.connect() as conn:
            for (k,) in conn.execute(select(key).order_by(order)).all():
                try:
                    out.append((k, conn.execute(select(table).where(key == k)).first()))
                except (ValueError, TypeError, OverflowError, UnicodeDecodeError):
                    out.append((k, None))
        return out

    def holds_exactly(self, table: Any, key: Any, value: str, parse: Any, data: bytes,
                      seal: bytes) -> bool:
        """Does the database hold exactly this record (`parse(row).canonical() == data`),
        with this seal? (Start-up: whether a record must be rolled forward.)"""
        try:
            row = self.fetch(None, select(table).where(key == value), table.name)
            return (row is not None and bytes(row.seal or b"") == seal
                    and parse(row).canonical() == data)
        except Exception:
            return False

    def refuse(self, conn: Any, record: str, why: str) -> KeysvcError:
        """The error for a record that fails its seal or anchor; its audit event is written
        once `conn`'s transaction has ended (or at once without one)."""
        log.warning("record %s: %s", record, why)
        if conn is not None:
            st.after_tx(conn, lambda: self._report(record, why))
        else:
            self._report(record, why)
        return error("RECORD_SEAL_INVALID", f"{record}: {why}; the database record was "
                     "altered, nothing was used", record=record)

    def flag(self, record: str, why: str, conn: Any = None) -> None:
        """An altered record that is shown as such (a listing) or worked around (a lost
        index row): audited, once `conn`'s transaction has ended if there is one."""
        log.warning("record %s: %s", record, why)
        if conn is not None:
            st.after_tx(conn, lambda: self._report(record, why))
        else:
            self._report(record, why)

    def _report(self, record: str, why: str) -> None:
        try:
            self.on_tamper(record, why)
        except Exception as exc:  # the refusal stands; the missing event is loud
            log.error("audit of an altered record failed: %s", type(exc).__name__)


__all__ = ["Records", "SEALING_PARTITIONS"]
