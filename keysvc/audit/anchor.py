"""The HSM's word on how long the audit chain is.

After every batch of events commits, its last sequence and hash are written into the admin
token (label `audit-anchor:<database instance>`), where nobody with the database can move
them back. So a suppressed insert, a deleted tail, a deleted head or an erased log leaves a
chain shorter than, or different from, what the token holds: VerifyAuditLog says so, and
the writer refuses to append to such a chain (it never silently starts a new one; an
operator who must continue says so with `keysvc audit new-chain`, itself an event).
"""
from __future__ import annotations

from dataclasses import dataclass

from keysvc.hsm import Token
from keysvc.hsm import keys as hk

LABEL = "audit-anchor:"
LEGACY_CHECKPOINT = "audit-checkpoint:"   # before issue 14: a copy every few seconds


@dataclass(frozen=True)
class Anchor:
    seq: int
    hash: str

    def encode(self) -> bytes:
        return self.seq.to_bytes(8, "big") + bytes.fromhex(self.hash)

    @classmethod
    def decode(cls, value: bytes) -> "Anchor":
        return cls(int.from_bytes(value[:8], "big"), value[8:40].hex())


class ChainAnchor:
    def __init__(self, token: Token, instance: str) -> None:
        self.token = token
        self.label = LABEL + instance

    def read(self) -> Anchor | None:
        """The newest anchor (highest sequence), or None before the first batch."""
        with self.token.session() as s:
            values = hk.data_values(s, self.label)
        return max((Anchor.decode(v) for v in values), key=lambda a: a.seq, default=None)

    def all(self) -> list[Anchor]:
        with self.token.session() as s:
            return [Anchor.decode(v) for v in hk.data_values(s, self.label)]

    def write(self, anchor: Anchor) -> list[Anchor]:
        """Write the new anchor; returns every anchor of the chain now in the token (another
        replica's may be beside it: the writer checks them before `prune`)."""
        with self.token.session() as s:
            hk.put_data(s, self.label, anchor.encode())
            return [Anchor.decode(v) for v in hk.data_values(s, self.label)]

    def prune(self, newest: Anchor, doomed: set[Anchor]) -> None:
        """Remove `doomed` anchors (older ones the chain holds); a crash before leaves
        several, and the highest counts."""
        with self.token.session() as s:
            hk.destroy_data(s, self.label, lambda v: Anchor.decode(v) in doomed
                            and Anchor.decode(v) != newest)

    def reset(self, anchor: Anchor) -> None:
        """Only for `keysvc audit new-chain`: the anchor names the new chain's head."""
        with self.token.session() as s:
            hk.put_data(s, self.label, anchor.encode())
            hk.destroy_data(s, self.label, lambda v: v != anchor.encode())

    def legacy_checkpoints(self, first_event_id: str) -> dict[int, set[str]]:
        """Checkpoints written before anchors existed: sequence -> hashes."""
        if not first_event_id:
            return {}
        with self.token.session() as s:
            values = hk.data_values(s, LEGACY_CHECKPOINT + first_event_id)
        out: dict[int, set[str]] = {}
        for v in values:
            out.setdefault(int.from_bytes(v[:8], "big"), set()).add(v[8:40].hex())
        return out
