"""The records' canonical encoding: length-prefixed fields after the record's kind, so
that no two records encode alike and no field spills into its neighbour. What a seal MACs
(seal.py), a tree seal's root message included (tree_seal.py, which seal.py imports: the
encoding lives apart from both)."""
from __future__ import annotations

import datetime as dt
import struct
from typing import Any


def utc_text(t: dt.datetime) -> str:
    t = t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_utc(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc)


def decode(data: bytes) -> list[bytes]:
    """The fields of a `canonical` encoding, kind first."""
    out, i = [], 0
    while i < len(data):
        n = int.from_bytes(data[i:i + 4], "big")
        if i + 4 + n > len(data):
            raise ValueError("truncated record")
        out.append(data[i + 4:i + 4 + n])
        i += 4 + n
    return out


LENGTH = struct.Struct(">I").pack  # a field's length, before it


def canonical(kind: str, *fields: Any) -> bytes:
    """Length-prefixed fields after the record's kind: no two records encode alike, and no
    field can spill into its neighbour. (On the S1SP hot path: once per device key.)"""
    parts = []
    for f in (kind, *fields):
        if isinstance(f, str):
            b = f.encode()
        elif isinstance(f, bytes):
            b = f
        elif isinstance(f, (bytearray, memoryview)):
            b = bytes(f)
        elif isinstance(f, dt.datetime):
            b = utc_text(f).encode()
        elif isinstance(f, bool):
            b = b"1" if f else b"0"
        elif f is None:
            b = b""
        else:
            b = str(f).encode()
        parts.append(LENGTH(len(b)))
        parts.append(b)
    return b"".join(parts)
