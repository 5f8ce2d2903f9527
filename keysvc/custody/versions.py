"""Versions of a long-lived key, read from the token.

A version exists when its key object does; the primary (used for every new write) is the
newest. Version 1 keeps the label the key had before versions existed (`storage-key`), so
tokens made earlier need nothing done to them; version n > 1 is labelled `storage-key@v<n>`.
Every stored record names the version it was wrapped with, inside its seal, so a row cannot
be pointed at another version without failing its seal check.
"""
from __future__ import annotations

import re
from typing import Any

from keysvc.hsm import keys as hk

_VERSIONED = re.compile(r"^(?P<base>.+?)@v(?P<n>[1-9][0-9]{0,5})$")


def label(base: str, version: int) -> str:
    if version < 1:
        raise ValueError("key versions start at 1")
    return base if version == 1 else f"{base}@v{version}"


def parse(text: str) -> tuple[str, int]:
    """(base, version) of a label; a label without a version suffix is version 1."""
    m = _VERSIONED.match(text)
    return (m["base"], int(m["n"])) if m else (text, 1)


def versions(s: Any, base: str) -> list[int]:
    """The versions of `base` present in the session's token, oldest first."""
    found = set()
    for text in hk.secret_key_labels(s):
        b, n = parse(text)
        if b == base:
            found.add(n)
    return sorted(found)


def primary(s: Any, base: str) -> int:
    """The newest version of `base`; HsmKeyNotFound if there is none."""
    found = versions(s, base)
    if not found:
        raise hk.HsmKeyNotFound(f"no version of {base!r} in the token")
    return found[-1]


def all_versions(s: Any, bases: tuple[str, ...]) -> dict[str, list[int]]:
    """base -> versions for each base, from one scan of the token."""
    out: dict[str, set[int]] = {b: set() for b in bases}
    for text in hk.secret_key_labels(s):
        b, n = parse(text)
        if b in out:
            out[b].add(n)
    return {b: sorted(v) for b, v in out.items()}


def stored_row_key(s: Any, version: int) -> Any:
    """The storage key version a stored row names. A version that is no longer in the
    token was destroyed (only once no row used it) or the row was rolled back to it: the
    key cannot be read, which is said plainly rather than as an HSM fault."""
    from keysvc.errors import error
    try:
        return hk.find_key(s, storage(s, version)[1])
    except hk.HsmKeyNotFound:
        raise error("KEY_VERSION_DESTROYED",
                    f"the stored key names storage key version {version}, "
                    "which this partition no longer has") from None


def storage(s: Any, version: int | None = None) -> tuple[int, str]:
    """(version, label) of the partition's storage key: the primary unless `version`
    names another (a stored row's)."""
    from keysvc.partitions import STORAGE_KEY
    v = primary(s, STORAGE_KEY) if version is None else version
    return v, label(STORAGE_KEY, v)
