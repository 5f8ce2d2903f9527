"""Domain values shared by every path: identifiers, problems, key roles.

Kept free of I/O so that the S1SP, DCO, certificate and escrow logic can share them and
be tested without a server or an HSM.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_EUI64_LOOSE = re.compile(r"^(?:[0-9A-Fa-f]{2}(?:-[0-9A-Fa-f]{2}){7}|[0-9A-Fa-f]{16})$")
_EUI64_CANONICAL = re.compile(r"[0-9A-F]{2}(?:-[0-9A-F]{2}){7}")


class InvalidEUI64(ValueError):
    """The text is not an EUI-64 in any accepted spelling."""


def normalise_eui64(text: str) -> str:
    """Return the canonical `00-DB-12-34-56-78-9A-BC` form.

    The profile lets a reader accept lower case and no separators; everything stored and
    returned uses the one canonical spelling so that lookups never miss on case.
    """
    if _EUI64_CANONICAL.fullmatch(text or ""):
        return text  # the usual case: already in the canonical form
    text = (text or "").strip()
    if not _EUI64_LOOSE.match(text):
        raise InvalidEUI64("not an EUI-64 (8 hex pairs, optionally joined by '-')")
    digits = text.replace("-", "").upper()
    return "-".join(digits[i:i + 2] for i in range(0, 16, 2))


def eui64_bytes(text: str) -> bytes:
    return bytes.fromhex(normalise_eui64(text).replace("-", ""))


def eui64_from_bytes(raw: bytes) -> str:
    if len(raw) != 8:
        raise InvalidEUI64("an EUI-64 is 8 bytes")
    return "-".join(f"{b:02X}" for b in raw)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one item; `code` is from api.md, `message` never holds secrets."""

    code: str
    message: str = ""
    field: str = ""


_KCV = re.compile(r"^[0-9A-F]{6,32}$")


class InvalidKcv(ValueError):
    """Not a check value: KCVs are upper-case hex, 3 (ECB) or 5 (CMAC) bytes and up."""


def normalise_kcv(text: str) -> str:
    kcv = (text or "").strip().upper()
    if not _KCV.match(kcv):
        raise InvalidKcv("a check value is hex digits (6 for ECB, 10 for CMAC)")
    return kcv
