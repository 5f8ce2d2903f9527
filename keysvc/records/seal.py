"""Seals: an HMAC-SHA256 made in the partition's token over a canonical encoding of a record.

A row is a claim, not a fact: whoever writes to the database can write any row. A seal
that only the HSM can make turns the claim into a fact about what keysvc itself wrote, and
the record's kind and every field that decides anything are inside it, so a row moved to
another key, device or purpose no longer opens (Vault's barrier binds an entry to its path
the same way). Freshness - an older sealed copy put back - is the anchors' job.
"""
from __future__ import annotations

import hmac
from typing import Any, Iterable

from keysvc.hsm import keys as hk
from keysvc.partitions import RECORD_SEAL_KEY
from keysvc.records import tree_seal
from keysvc.records.encoding import canonical, decode, parse_utc, utc_text  # noqa: F401


class Sealer:
    """The record-seal key of one partition's token."""

    def __init__(self, token: Any) -> None:
        self.token = token

    def seal(self, data: bytes) -> bytes:
        return self.seal_many([data])[0]

    def seal_many(self, items: Iterable[bytes]) -> list[bytes]:
        with self.token.session() as s:
            key = hk.find_key(s, RECORD_SEAL_KEY)
            return [hk.hmac_sha256_direct(s, key, d) for d in items]

    def valid(self, data: bytes, seal: Any) -> bool:
        return self.valid_many([(data, seal)])[0]

    def valid_many(self, pairs: list[tuple[bytes, Any]], *, trees: bool = False
                   ) -> list[bool]:
        """Each (record, seal) pair: does the seal verify? A seal column holding anything
        but bytes (SQLite keeps any type) does not. `trees`: a tree seal (tree_seal.py) is
        accepted too; records sealed together share one root, MACed once here."""
        wanted: list[tuple[bytes, bytes] | None] = []  # (message to MAC, MAC the seal holds)
        for data, seal in pairs:
            if not isinstance(seal, (bytes, bytearray, memoryview)):
                wanted.append(None)
            elif trees and tree_seal.is_tree_seal(seal):
                wanted.append(tree_seal.opened(data, bytes(seal)))
            else:
                wanted.append((data, bytes(seal)))
        messages = list(dict.fromkeys(w[0] for w in wanted if w is not None))
        made = dict(zip(messages, self.seal_many(messages)))
        return [w is not None and hmac.compare_digest(made[w[0]], w[1]) for w in wanted]
