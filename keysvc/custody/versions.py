"""Versions of a long-lived key, read from the token.

A version exists when its key object does; the primary (used for every new write) is the
newest. Version 1 keeps the label the key had before versions existed (`storage-key`), so
tokens made earlier need nothing done to them; version n > 1 is labelled `storage-key@v<n>`.
Every stored record names the version it was wrapped with, inside its seal, so a row cannot
be pointed at another version without failing its seal check.
"""
from __future__ import annotations

import hmac
import re
import time
from typing import Any

from keysvc.hsm import keys as hk

_VERSIONED = re.compile(r"^(?P<base>.+?)@v(?P<n>[1-9][0-9]{0,5})$")


def label(base: str, version: int) -> str:
    if version < 1:
        raise ValueError("key versions start at 1")
    return base if version == 1 else f"{base}@v{version}"


def parse(text: str) -> tuple[str, int]:
    """(base, version) of a label; a label without a version suffix is version 1."""
    m = _VERSIONED.fullmatch(text)
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


# A MAC or seal kept as text names its version in front, from version 2 on ("v2:<hex>");
# version 1 is bare hex, as every MAC made before versions existed. The version in front is
# not inside the MAC, and need not be: a MAC made under one version does not verify under
# another, so renaming it only makes it fail.
_TAGGED = re.compile(r"^v(?P<n>[2-9]|[1-9][0-9]{1,5}):(?P<mac>[0-9a-f]{64})$")
_BARE = re.compile(r"^[0-9a-f]{64}$")


def tagged(version: int, mac: bytes) -> str:
    return mac.hex() if version == 1 else f"v{version}:{mac.hex()}"


def untagged(text: str) -> tuple[int, bytes]:
    """(version, MAC) of a `tagged` text; ValueError if it is not exactly what `tagged`
    makes (no "v1:" alias of a version-1 MAC: a count of bare hex is version 1's count)."""
    if not isinstance(text, str):
        raise ValueError("a tagged MAC is text")
    m = _TAGGED.fullmatch(text)
    if m:
        return int(m["n"]), bytes.fromhex(m["mac"])
    if _BARE.fullmatch(text):
        return 1, bytes.fromhex(text)
    raise ValueError("not a tagged MAC")


_made: dict[str, int] = {}  # base -> versions this process made (keysvc/custody/rotation.py)


def made(base: str) -> None:
    """This process made a new version of `base`: views of the versions kept for a while
    (the audit writer's) read the token again at once."""
    _made[base] = _made.get(base, 0) + 1


def made_here(base: str) -> int:
    return _made.get(base, 0)


REREAD_BACKOFF = 60.0  # seconds a version found missing after a re-read is not looked for
_missing: dict[tuple[str, str, int], float] = {}


def see(token: Any, base: str, version: int) -> None:
    """Make this process's view of the token show `version` of `base`, if the token has it.

    Another process (a worker, a replica, the other organisation's process) may have made
    it, and SoftHSM2 can show another process's new object only after the token is read
    again, which re-initialises the module and makes every long call in flight start over.
    A version the database names is the database's word, so the token is read again only
    for the next version after the primary (rotations make one at a time), and at most
    once a minute for each version it then still lacks. A version the token does not have
    is left to the check that needs it, which fails (a forged or destroyed version)."""
    with token.session() as s:
        known = primary(s, base)
    if version <= known or version > known + 1:
        return
    key = (str(getattr(getattr(token, "config", None), "label", id(token))), base, version)
    if time.monotonic() - _missing.get(key, -REREAD_BACKOFF) < REREAD_BACKOFF:
        return
    token.refresh()
    with token.session() as s:
        if version > primary(s, base):
            _missing[key] = time.monotonic()


def newest_named(texts: Any) -> int:
    """The newest version that any of these tagged MACs names (1 if none parses)."""
    top = 1
    for t in texts:
        try:
            top = max(top, untagged(t)[0])
        except ValueError:
            continue
    return top


class MacKeys:
    """The versions of one HMAC key (audit-mac, escrow-seal) within one session: new MACs
    under the primary, each check under the version it names. A version the token does not
    hold (destroyed, or named by a forged row) makes its check fail, never raise."""

    def __init__(self, s: Any, base: str) -> None:
        self.s = s
        self.base = base
        self.primary = primary(s, base)
        self._keys: dict[int, Any] = {}

    def key(self, version: int) -> Any:
        if version not in self._keys:
            self._keys[version] = hk.find_key(self.s, label(self.base, version))
        return self._keys[version]

    def mac(self, data: bytes, version: int | None = None) -> bytes:
        return hk.hmac_sha256_direct(self.s, self.key(version or self.primary), data)

    def make(self, data: bytes) -> str:
        """A tagged MAC under the primary version."""
        return tagged(self.primary, self.mac(data))

    def check(self, data: bytes, text: Any) -> bool:
        try:
            version, mac = untagged(text)
            return hmac.compare_digest(self.mac(data, version), mac)
        except (ValueError, hk.HsmKeyNotFound):
            return False
