"""The HSM partitions keysvc runs on: one token each for S1SP, DCO and administration.

S1SP and DCO are separate tokens with separate PINs and storage keys, so code holding the
S1SP token has no handle that could reach a master key (dual control). The admin token
holds what belongs to neither: the audit MAC key, the escrow seal key, the roster of
officers, and a record-seal key for the operations that change that roster.
"""
from __future__ import annotations

import logging
from typing import Any

from keysvc.config import Settings
from keysvc.custody import versions
from keysvc.hsm import Token, TokenConfig
from keysvc.hsm import keys as hk

log = logging.getLogger(__name__)

STORAGE_KEY = "storage-key"
COMPONENT_SEAL_KEY = "component-seal"   # AES-GCM over officers' pending key components
AUDIT_MAC_KEY = "audit-mac"
ESCROW_SEAL_KEY = "escrow-seal"
# HMAC over every sealed database record of the partition (keysvc/records): key records,
# operations, import jobs, stored device or master keys, stored file results.
RECORD_SEAL_KEY = "record-seal"

# The long-lived keys of each partition's token, and how each is made: what the backup
# ceremony takes out and a restore puts back (keysvc/custody/backup.py).
LONG_LIVED = {"s1sp": (STORAGE_KEY, COMPONENT_SEAL_KEY, RECORD_SEAL_KEY),
              "dco": (STORAGE_KEY, COMPONENT_SEAL_KEY, RECORD_SEAL_KEY),
              "admin": (AUDIT_MAC_KEY, ESCROW_SEAL_KEY, RECORD_SEAL_KEY)}
# base label -> (AES or not, usage)
KIND = {STORAGE_KEY: (True, hk.STORAGE_USAGE), COMPONENT_SEAL_KEY: (True, hk.SEAL_USAGE),
        AUDIT_MAC_KEY: (False, hk.MAC_USAGE), ESCROW_SEAL_KEY: (False, hk.MAC_USAGE),
        RECORD_SEAL_KEY: (False, hk.MAC_USAGE)}

# Which partition's token holds a key of each purpose.
PURPOSE_PARTITION = {"S1SP_TRANSPORT": "s1sp", "EXPORT": "s1sp", "DCO_TRANSPORT": "dco"}


class Served(dict):
    """Per-partition things of the partitions this process serves. Another partition's is
    not here, and asking for it is a clear refusal (FAILED_PRECONDITION
    PARTITION_NOT_SERVED), never a KeyError: in a split deployment the other organisation's
    process holds that token, and this one has not even read its PIN."""

    def __missing__(self, partition: str) -> Any:
        from keysvc.errors import error
        raise error("PARTITION_NOT_SERVED", f"this process does not serve the {partition} "
                                            f"partition (serve --partitions)")


class Partitions:
    def __init__(self, settings: Settings) -> None:
        # The sentinel is a key never rotated: storage key version 1 may be destroyed once
        # every row is rewrapped (keysvc/custody/rewrap.py).
        self.served: tuple[str, ...] = settings.served
        self.tokens: Served = Served({
            p: Token(TokenConfig(module=settings.pkcs11_module,
                                 label=settings.token_label(p), pin=settings.pin(p),
                                 pool_size=settings.hsm_pool_size,
                                 acquire_timeout=settings.hsm_acquire_timeout,
                                 sentinel=RECORD_SEAL_KEY))
            for p in self.served})

    @property
    def s1sp(self) -> Token:
        return self.tokens["s1sp"]

    @property
    def dco(self) -> Token:
        return self.tokens["dco"]

    @property
    def admin(self) -> Token:
        return self.tokens["admin"]

    def for_purpose(self, purpose: str) -> Token:
        return self.tokens[PURPOSE_PARTITION[purpose]]

    def close(self) -> None:
        for t in self.tokens.values():
            t.close()

    def new_tokens(self) -> list[str]:
        """The served partitions whose token holds none of its long-lived keys yet (a
        token made for this start, or re-initialised): looked at before `bootstrap` makes
        any, so the answer is the same at every start until then."""
        out = []
        for name, token in self.tokens.items():
            with token.session() as s:
                present = {versions.parse(label)[0] for label in hk.secret_key_labels(s)}
            if not present & set(LONG_LIVED[name]):
                out.append(name)
        return out

    def bootstrap(self) -> None:
        """Make the per-token keys on first start, inside the token, sensitive and
        extractable only by the backup ceremony (hk.CUSTODY)."""
        for name, token in self.tokens.items():
            with token.session() as s:
                present = {versions.parse(label)[0] for label in hk.secret_key_labels(s)}
                for label in LONG_LIVED[name]:
                    if label in present:  # some version of it (version 1 may be destroyed)
                        continue
                    log.info("generating %s in token %s", label, token.config.label)
                    generate(s, label)


def generate(s: Any, label: str, key_id: str = "") -> None:
    """A new long-lived key (or version of one) as its base label's kind says; `key_id`
    names the operation that made a rotated version."""
    aes, usage = KIND[versions.parse(label)[0]]
    if aes:
        hk.generate_aes(s, label, usage=usage, key_id=key_id)
    else:
        hk.generate_hmac(s, label, key_id=key_id)

