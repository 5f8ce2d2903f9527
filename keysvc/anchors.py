"""Anchors: the current seal of each changing sealed record, kept in a token.

An HMAC seal made in the HSM stops a record from being edited, but not from being put back
as it was: an older sealed copy (from a backup, or saved before a release) still carries a
valid seal. So the token also holds each record's seal as a private, unmodifiable data
object that the database's writers can neither change nor roll back, and a record is
current only if its seal is the anchored one.

Each anchor value is the seal, a generation (one more at every change of the record) and
a payload (what the record's owner needs to act without the database: the full record for
keys and operations, the CHFs and release count for escrow). A change anchors its new seal
at the next generation while the record's row is locked, before the commit, and removes the
anchor it replaced after the commit. A crash between the two leaves both; only the newer
generation counts, so an older copy put back is refused even then, and start-up
reconciliation rolls the database forward to the newest anchor (the token's word, never the
database's, decides; keysvc/records/reconcile.py). A change that fails before its commit
removes its new anchor again.
"""
from __future__ import annotations

import hmac
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from keysvc.hsm import HsmKeyNotFound
from keysvc.hsm import keys as hk
from keysvc.store import Store

log = logging.getLogger("keysvc.anchors")

SEAL_BYTES = 32  # HMAC-SHA256
GEN_BYTES = 8

# anchor(record_id, new_seal, seal_it_replaces or None for a new record, payload)
Anchor = Callable[..., None]


@dataclass(frozen=True)
class Anchored:
    seal: bytes
    generation: int
    payload: bytes


def pack(seal: bytes, generation: int, payload: bytes = b"") -> bytes:
    return bytes(seal) + generation.to_bytes(GEN_BYTES, "big") + payload


def unpack(value: bytes) -> Anchored:
    return Anchored(value[:SEAL_BYTES],
                    int.from_bytes(value[SEAL_BYTES:SEAL_BYTES + GEN_BYTES], "big"),
                    value[SEAL_BYTES + GEN_BYTES:])


def newest(values: list[bytes]) -> list[Anchored]:
    """The anchors of the newest generation (one, unless a crashed creation left two)."""
    found = [unpack(v) for v in values]
    if not found:
        return []
    top = max(a.generation for a in found)
    return [a for a in found if a.generation == top]


def anchored(values: list[bytes], seal: bytes | None) -> bool:
    """Is `seal` (all of it) the seal of the newest anchor among these values?"""
    if not seal or len(seal) != SEAL_BYTES:
        return False
    return any(hmac.compare_digest(a.seal, bytes(seal)) for a in newest(values))


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
        """record id -> anchor values, in one search (a token scans all its objects for
        any search, so one search per record would make a listing quadratic)."""
        with self.token.session() as s:
            found = hk.data_by_label(s, self.prefix)
        return {label[len(self.prefix):]: values for label, values in found.items()}

    def add(self, seals: dict[str, tuple[bytes, bytes]]) -> None:
        """Anchor records (id -> (seal, payload)) outside any change of theirs: only for
        records that have no anchor at all (the one-time upgrade)."""
        with self.token.session() as s:
            for rid, (seal, payload) in seals.items():
                hk.put_data(s, self.label(rid), pack(seal, 1, payload))

    def newest(self, record_id: str) -> list[Anchored]:
        """The record's newest anchors, read afresh."""
        with self.token.session() as s:
            return newest(hk.data_values(s, self.label(record_id)))

    def settle(self, record_id: str, keep: bytes) -> None:
        """Remove the record's anchors older than `keep` (start-up, once the database holds
        `keep`'s record); nothing if `keep` itself is gone meanwhile."""
        generation = unpack(keep).generation
        with self.token.session() as s:
            label = self.label(record_id)
            if keep in hk.data_values(s, label):
                hk.destroy_data(s, label, lambda v: unpack(v).generation < generation)

    @contextmanager
    def tx(self, store: Store) -> Iterator[tuple[Any, Anchor]]:
        """A write transaction, and `anchor(...)` for each record it seals, called while
        that record's row is locked."""
        made: list[tuple[str, bytes, bytes | None]] = []

        def anchor(record_id: str, seal: bytes, old_seal: bytes | None,
                   payload: bytes = b"") -> None:
            label = self.label(record_id)
            with self.token.session() as s:
                values = hk.data_values(s, label)
                if old_seal is None:
                    # A new record: anything anchored under its id was left by a creation
                    # that never committed (the row did not exist, or the insert failed).
                    old_value, generation = None, 1
                    hk.destroy_data(s, label)
                else:
                    old = [v for v in values
                           if hmac.compare_digest(unpack(v).seal, bytes(old_seal))]
                    if not old:
                        raise HsmKeyNotFound(f"{label}: the record's anchor is gone")
                    old_value, generation = old[0], unpack(old[0]).generation + 1
                    # under the row lock: older leftovers of a crash go
                    hk.destroy_data(s, label, lambda v: v != old_value)
                value = pack(seal, generation, payload)
                hk.put_data(s, label, value)
            made.append((label, value, old_value))
        forgotten = False
        try:
            with store.tx() as conn:
                try:
                    yield conn, anchor
                except BaseException:
                    # While the rows are still locked: whoever waits on them (start-up on
                    # another replica) finds the anchors of this failed change gone.
                    self._forget([(label, value) for label, value, _ in made], "rollback")
                    forgotten = True
                    raise
        except BaseException:
            if not forgotten:  # the commit itself failed
                self._forget([(label, value) for label, value, _ in made], "rollback")
            raise
        # Outside the lock only the replaced anchor goes: by now another transaction may
        # have locked the row, anchored its own seal and committed.
        self._forget([(label, old) for label, _, old in made if old is not None], "commit")

    def _forget(self, anchors: list[tuple[str, bytes]], after: str) -> None:
        for label, value in anchors:
            try:
                with self.token.session() as s:
                    hk.destroy_data(s, label, lambda v: v == value)
            except Exception as exc:  # the HSM went away: the newer generation still wins
                log.error("%s: anchor not removed after %s: %s", label, after,
                          type(exc).__name__)
