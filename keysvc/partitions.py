"""The HSM partitions keysvc runs on: one token each for S1SP, DCO and administration.

S1SP and DCO are separate tokens with separate PINs and storage keys, so code holding the
S1SP token has no handle that could reach a master key (dual control). The admin token
holds what belongs to neither: the audit MAC key, the escrow seal key, the roster of
officers, and a record-seal key for the operations that change that roster.
"""
from __future__ import annotations

import logging

from hsm import Token, TokenConfig
from hsm import keys as hk
from keysvc.config import PARTITIONS, Settings

log = logging.getLogger(__name__)

STORAGE_KEY = "storage-key"
COMPONENT_SEAL_KEY = "component-seal"   # AES-GCM over officers' pending key components
AUDIT_MAC_KEY = "audit-mac"
ESCROW_SEAL_KEY = "escrow-seal"
# HMAC over every sealed database record of the partition (keysvc/records): key records,
# operations, import jobs, stored device or master keys, stored file results.
RECORD_SEAL_KEY = "record-seal"

# Which partition's token holds a key of each purpose.
PURPOSE_PARTITION = {"S1SP_TRANSPORT": "s1sp", "EXPORT": "s1sp", "DCO_TRANSPORT": "dco"}


class Partitions:
    def __init__(self, settings: Settings) -> None:
        self.tokens: dict[str, Token] = {
            p: Token(TokenConfig(module=settings.pkcs11_module,
                                 label=settings.token_label(p), pin=settings.pin(p),
                                 pool_size=settings.hsm_pool_size,
                                 acquire_timeout=settings.hsm_acquire_timeout,
                                 sentinel=STORAGE_KEY if p != "admin" else AUDIT_MAC_KEY))
            for p in PARTITIONS}

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

    def bootstrap(self) -> None:
        """Make the per-token keys on first start, inside the token, non-extractable."""
        for name, token in self.tokens.items():
            with token.session() as s:
                wanted = ([STORAGE_KEY, COMPONENT_SEAL_KEY, RECORD_SEAL_KEY] if name != "admin"
                          else [AUDIT_MAC_KEY, ESCROW_SEAL_KEY, RECORD_SEAL_KEY])
                for label in wanted:
                    if hk.has_key(s, label):
                        continue
                    log.info("generating %s in token %s", label, token.config.label)
                    if label == STORAGE_KEY:
                        hk.generate_aes(s, label, usage=hk.STORAGE_USAGE)
                    elif label == COMPONENT_SEAL_KEY:
                        hk.generate_aes(s, label, usage=hk.SEAL_USAGE)
                    else:
                        hk.generate_hmac(s, label)

    def close(self) -> None:
        for t in self.tokens.values():
            t.close()
