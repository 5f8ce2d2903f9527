"""Everything a request needs, built once at start: settings, store, tokens, audit, trust.

Domain functions take an `App` and plain values, so they run the same under the gRPC
server, the tests and the benchmarks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from keysvc.audit import AuditLog
from keysvc.clock import Clock, utc_now
from keysvc.config import Settings
from keysvc.device_certificate import TrustStore
from keysvc.partitions import Partitions
from keysvc.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caller:
    """Who is calling: identity from the certificate CN, role from its SAN URI."""

    identity: str
    role: str


@dataclass
class App:
    settings: Settings
    store: Store
    partitions: Partitions
    trust: TrustStore
    clock: Clock = utc_now
    audit: AuditLog = field(init=False)

    def __post_init__(self) -> None:
        self.audit = AuditLog(self.store, self.partitions, self.clock)

    @classmethod
    def open(cls, settings: Settings, clock: Clock = utc_now) -> "App":
        from keysvc.devstate import ensure_dev_state, point_softhsm_at
        if settings.dev:
            ensure_dev_state(settings)
        point_softhsm_at(settings)
        store = Store(settings.db_url)
        store.migrate()
        partitions = Partitions(settings)
        partitions.bootstrap()
        trust = TrustStore.from_dir(settings.trust_anchors)
        log.info("trust anchors loaded: %d, CRLs: %d", len(trust.anchors), len(trust.crls))
        return cls(settings, store, partitions, trust, clock)

    def close(self) -> None:
        self.partitions.close()
        self.store.close()
