"""Anchors: the current seal of each sealed database record, kept in the admin token.

An HMAC seal made in the HSM stops a record from being edited, but not from being put back
as it was: an older sealed copy (from a backup, or saved before a release) still carries a
valid seal. So the token also holds each record's current seal as a private, unmodifiable
data object that the database's writers can neither change nor roll back, and a record is
current only if its seal is anchored.

A record's anchor changes while its row is locked: the new anchor is made before the
commit and removed again if the commit does not happen, and the one it replaces is
destroyed after the commit. A crash between the two leaves both, so until that record's
next change its previous state would also pass; that change clears such leftovers.
"""
from __future__ import annotations

import hmac
import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from hsm import HsmKeyNotFound
from hsm import keys as hk
from keysvc.store import Store

log = logging.getLogger("keysvc.anchors")

# anchor(record_id, new_seal, seal_it_replaces or None for a new record)
Anchor = Callable[[str, bytes, "bytes | None"], None]
SEAL_BYTES = 32  # an anchor's value starts with the record's seal (HMAC-SHA256)


def anchored(values: list[bytes], seal: bytes) -> bool:
    """Is `seal` the seal one of these anchor values holds? (A value may carry more after
    the seal: escrow anchors also name their CHFs, so a deleted record is still found.)"""
    return any(hmac.compare_digest(v[:SEAL_BYTES], bytes(seal)) for v in values)


class Anchors:
    def __init__(self, token: Any, prefix: str) -> None:
        self.token = token
        self.prefix = prefix

    def label(self, record_id: str) -> str:
        return f"{self.prefix}{record_id}"

    def holds(self, record_id: str, seal: bytes) -> bool:
        label = self.label(record_id)

        def work(s) -> bool:
            if not anchored(hk.data_values(s, label), seal):
                # Another replica's new anchor may be hidden from a stale view of the
                # token: Token.run re-reads the token and asks once more.
                raise HsmKeyNotFound(label)
            return True
        try:
            return self.token.run(work)
        except HsmKeyNotFound:
            return False

    def all(self) -> dict[str, list[bytes]]:
        """record id -> anchored seals, in one search (a token scans all its objects for
        any search, so one search per record would make a listing quadratic)."""
        with self.token.session() as s:
            found = hk.data_by_label(s, self.prefix)
        return {label[len(self.prefix):]: seals for label, seals in found.items()}

    def add(self, seals: dict[str, bytes]) -> None:
        """Anchor records (id -> seal) outside any change of theirs: only for records
        that have no anchor at all, such as those made before anchors existed."""
        with self.token.session() as s:
            for rid, seal in seals.items():
                hk.put_data(s, self.label(rid), seal)

    @contextmanager
    def tx(self, store: Store) -> Iterator[tuple[Any, Anchor]]:
        """A write transaction, and `anchor(...)` for each record it seals, called while
        that record's row is locked."""
        made: list[tuple[str, bytes, bytes | None]] = []

        def anchor(record_id: str, seal: bytes, old_seal: bytes | None) -> None:
            label = self.label(record_id)
            with self.token.session() as s:
                if old_seal is not None:  # under the row lock: leftovers of a crash go
                    hk.destroy_data(s, label, lambda v: v != old_seal)
                hk.put_data(s, label, seal)
            made.append((label, seal, old_seal))
        try:
            with store.tx() as conn:
                yield conn, anchor
        except BaseException:
            self._forget([(label, seal) for label, seal, _ in made], "rollback")
            raise
        # Outside the lock only the replaced seal goes: by now another transaction may
        # have locked the row, anchored its own seal and committed.
        self._forget([(label, old) for label, _, old in made if old is not None], "commit")

    def _forget(self, anchors: list[tuple[str, bytes]], after: str) -> None:
        for label, seal in anchors:
            try:
                with self.token.session() as s:
                    hk.destroy_data(s, label, lambda v: v == seal)
            except Exception as exc:  # the HSM went away: the record's next change tidies up
                log.error("%s: anchor not removed after %s: %s", label, after,
                          type(exc).__name__)
