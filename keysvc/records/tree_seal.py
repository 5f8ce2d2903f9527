"""Tree seals: one HSM HMAC for up to 16 stored keys, each still verifiable on its own.

Why: a stored key's seal was an HMAC made in the token per row, about 30 µs of a device
key's 110 (the rest is creating, check-valuing, wrapping and destroying the key, the work
the service cannot avoid). A file of 35,000 installations writes 140,000 rows.

How: the rows written together are the leaves of a small Merkle tree (SHA-256, leaves and
nodes hashed apart as RFC 6962 does: 0x00 before a leaf, 0x01 before two children); the
token MACs only the root, under the same record-seal key and through the same canonical
encoding as every other record (kind "record-seal-tree", no record's kind, with the leaf
count). Each row's seal is that MAC with the row's place in the tree and the sibling
hashes up to the root:

    0x01 | leaf index (1 byte) | leaf count (1 byte) | root MAC (32) | siblings (32 each)

A row verifies when its own fields, hashed as a leaf and walked up its path, give a root
whose MAC the token makes again. Nothing else is trusted from the database: forging or
moving a row needs a second SHA-256 preimage or the token's key. A classic seal is 32 bytes
(a plain HMAC over the row), which no tree seal is, so rows written before tree seals keep
verifying as they always did; tree seals are accepted only where a caller asks
(`Sealer.valid_many(..., trees=True)`: stored keys).

Cost: 16 leaves give 4 siblings, a seal of 163 bytes instead of 32 (140,000 rows: 18 MB
more in the database), and one HMAC per 16 rows (bench/bench_s1sp.py, bench_dco.py).
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Generic, TypeVar

from keysvc.hsm import keys as hk
from keysvc.partitions import RECORD_SEAL_KEY
from keysvc.records.encoding import canonical

LEAVES = 16  # rows under one root: one HMAC per 16 rows, 4 siblings in each seal
FORMAT = 1
HEADER = 3 + 32  # format, index, count, root MAC
KIND = "record-seal-tree"
_sha256 = hashlib.sha256


def leaf(data: bytes) -> bytes:
    return _sha256(b"\x00" + data).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return _sha256(b"\x01" + left + right).digest()


def root_message(root: bytes, count: int) -> bytes:
    """What the token MACs for a tree, in the records' own encoding. The leaf count is in
    it, so that a seal's header cannot be changed to another count that happens to walk the
    same path."""
    return canonical(KIND, count, root)


def _paths(leaves: list[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """The root and each leaf's siblings, bottom up. A node without a sibling at its level
    (the last of an odd count) goes up as it is."""
    paths: list[list[bytes]] = [[] for _ in leaves]
    members = [[i] for i in range(len(leaves))]  # the leaves under each node of the level
    level = leaves
    while len(level) > 1:
        up, up_members = [], []
        for j in range(0, len(level) - 1, 2):
            for i in members[j]:
                paths[i].append(level[j + 1])
            for i in members[j + 1]:
                paths[i].append(level[j])
            up.append(_node(level[j], level[j + 1]))
            up_members.append(members[j] + members[j + 1])
        if len(level) % 2:
            up.append(level[-1])
            up_members.append(members[-1])
        level, members = up, up_members
    return level[0], paths


def seals(datas: list[bytes], mac: Callable[[bytes], bytes]) -> list[bytes]:
    """The tree seals of up to LEAVES records (canonical encodings), `mac` made in the token."""
    assert 0 < len(datas) <= LEAVES
    root, paths = _paths([leaf(d) for d in datas])
    head = mac(root_message(root, len(datas)))
    n = len(datas)
    return [bytes((FORMAT, i, n)) + head + b"".join(p) for i, p in enumerate(paths)]


def is_tree_seal(seal: Any) -> bool:
    return isinstance(seal, (bytes, bytearray, memoryview)) and len(seal) >= HEADER \
        and seal[0] == FORMAT


def opened(data: bytes, seal: bytes) -> tuple[bytes, bytes] | None:
    """(the root message the token must MAC, the MAC the seal holds), or None for a seal that
    cannot be this record's in any tree (a malformed place or path)."""
    index, count = seal[1], seal[2]
    leaves = count
    if not 0 <= index < count <= LEAVES or (len(seal) - HEADER) % 32:
        return None
    siblings = [seal[k:k + 32] for k in range(HEADER, len(seal), 32)]
    h, used = leaf(data), 0
    while count > 1:
        if index % 2 or index + 1 < count:
            if used == len(siblings):
                return None
            s = siblings[used]
            used += 1
            h = _node(s, h) if index % 2 else _node(h, s)
        index, count = index // 2, (count + 1) // 2
    if used != len(siblings):
        return None
    return root_message(h, leaves), seal[3:HEADER]


T = TypeVar("T")


class TreeSealer(Generic[T]):
    """Seals inside a per-key HSM loop: records are added one by one, every LEAVES of them
    are sealed as one tree (a session copy of the seal key, direct C_Sign), and `finish`
    seals the rest and returns every seal in the order the records were added. It runs in
    the loop's session, which the caller retires after use (the key copy goes with it)."""

    def __init__(self, session: Any, encode: Callable[[T], bytes],
                 key_label: str = RECORD_SEAL_KEY) -> None:
        self.session = session
        self.encode = encode
        self.key = hk.session_copy(session, key_label)
        self._pending: list[bytes] = []
        self._done: list[bytes] = []

    def _mac(self, data: bytes) -> bytes:
        return hk.hmac_sha256_direct(self.session, self.key, data)

    def add(self, record: T) -> None:
        self._pending.append(self.encode(record))
        if len(self._pending) == LEAVES:
            self._done += seals(self._pending, self._mac)
            self._pending = []

    def finish(self) -> list[bytes]:
        if self._pending:
            self._done += seals(self._pending, self._mac)
            self._pending = []
        return self._done
