"""Everything a request needs, built once at start: settings, store, tokens, audit, trust.

Domain functions take an `App` and plain values, so they run the same under the gRPC
server, the tests and the benchmarks.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from keysvc import store as st
from keysvc.audit.log import AuditLog
from keysvc.certpool import CertificateChecker
from keysvc.clock import Clock, utc_now
from keysvc.config import Settings
from keysvc.device_certificate import TrustStore
from keysvc.identity.caller import Caller  # noqa: F401 (domain code imports it from here)
from keysvc.identity.roster import Roster
from keysvc.identity.vouched import Vouched
from keysvc.partitions import Partitions
from keysvc.records import Records
from keysvc.store import Store

log = logging.getLogger(__name__)


@dataclass
class App:
    settings: Settings
    store: Store
    partitions: Partitions
    trust: TrustStore
    clock: Clock = utc_now
    cert_workers: int = 0
    audit: AuditLog = field(init=False)
    records: Records = field(init=False)
    roster: Roster = field(init=False)
    vouched: Vouched = field(init=False)
    _checker: CertificateChecker | None = field(init=False, default=None)
    # The rewrap job, in the one server process that runs it (keysvc/custody/rewrap.py).
    rewrap: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        # Through `self`, so that a test (or faketime) replacing app.clock moves the audit too.
        s = self.settings
        self.records = Records(self.store, self.partitions, self._record_tampered)
        self.audit = AuditLog(
            self.store, self.partitions, lambda: self.clock(),
            instance=lambda: self.records.instance, timeout=s.audit_timeout_seconds,
            sink_dir=s.audit_files, sink_max_bytes=s.audit_file_max_bytes,
            sink_keep=s.audit_file_keep, anchor_slots=s.path("audit-anchor-slots"),
            commit_delay=s.audit_commit_delay_ms / 1000,
            syslog={"address": s.audit_syslog, "ca_file": s.audit_syslog_ca,
                    "cert_file": s.audit_syslog_cert, "key_file": s.audit_syslog_key,
                    "timeout": s.audit_timeout_seconds} if s.audit_syslog else None)
        self.roster = Roster(self.partitions.admin, self.settings.roster_refresh_seconds,
                             self.store)
        self.vouched = Vouched(self.partitions.tokens, self.settings.roster_refresh_seconds)
        self.records.audited = self._audited_effect

    @contextmanager
    def _audited_effect(self, action: str, target: str) -> Iterator[None]:
        """keysvc's own effect (a start-up roll-forward): its event is written in its
        transaction, and chained once it has committed (or, if the audit trail fails then,
        by the next sweep of intents)."""
        call = self.audit.call("keysvc", "", action, lambda: target)
        hook = st.before_commit.set(call.before_commit)
        try:
            yield
        finally:
            st.before_commit.reset(hook)
        try:
            self.audit.finish(call, "OK", "OK")
        except Exception as exc:
            log.error("the event of %s waits for the next sweep: %s", action,
                      type(exc).__name__)

    def _record_tampered(self, record: str, why: str) -> None:
        """A sealed record failed its check: the audit trail says which, and that it was
        refused (or, in a listing, flagged)."""
        self.audit.append(actor="keysvc", role="", action="record.seal_invalid",
                          target=f"{record}: {why}", outcome="ERROR",
                          code="RECORD_SEAL_INVALID")

    @property
    def certificates(self) -> CertificateChecker:
        """Checks DeviceCertificates against the current trust store (tests may swap it)."""
        if self._checker is None or self._checker.trust is not self.trust:
            if self._checker is not None:
                self._checker.close()
            self._checker = CertificateChecker(self.trust, self.cert_workers)
        return self._checker

    @classmethod
    def open(cls, settings: Settings, clock: Clock = utc_now, *, recover_audit: bool = True,
             backup_ceremony: bool = False, helper: bool = False) -> "App":
        """`backup_ceremony`: opened by `keysvc admin backup`, whose own backup keys are in
        the tokens (any other start removes such leftovers). `helper`: a server's helper
        process (the rewrap job), which leaves the start's duties to its server."""
        from keysvc.devstate import ensure_dev_state, point_softhsm_at
        if settings.dev:
            ensure_dev_state(settings)
        point_softhsm_at(settings)
        store = Store(settings.db_url)
        partitions = Partitions(settings)
        with store.starting():  # one process at a time (replicas, split processes)
            store.migrate()
            from keysvc.records import holds_records_of
            for partition in partitions.new_tokens():
                if holds_records_of(store, partition):
                    # Rows wrapped, sealed or MACed under keys a new token cannot have:
                    # lost tokens (restore them), or the wrong database.
                    raise SystemExit(
                        f"the {partition} token is new (none of its keys) but the database "
                        "holds its records: restore the token (keysvc admin restore) or give "
                        "it a new database; refusing to start")
            partitions.bootstrap()
            trust = TrustStore.from_dir(settings.trust_anchors)
            log.info("trust anchors loaded: %d, CRLs: %d", len(trust.anchors),
                     len(trust.crls))
            app = cls(settings, store, partitions, trust, clock,
                      cert_workers=settings.certificate_workers)
            from keysvc.records.reconcile import reconcile
            from keysvc.records.upgrade import upgrade_once
            app.records.ensure_instance(dev=settings.dev)
            if helper:  # the start's duties are its server's, done before it was started
                return app
            upgrade_once(app.records, also=app.records.escrows.reanchor_legacy)
            reconcile(app.records)
            app.records.escrows.roll_forward()
        from keysvc.identity.admission import seed_roster, seed_vouched
        seed_roster(app)
        seed_vouched(app)
        try:  # roster changes a crash left pending: counted if approved, else dropped
            from keysvc.officers import settle_stale
            settle_stale(app)
        except Exception as exc:
            log.error("pending roster changes not settled at start: %s", type(exc).__name__)
        if recover_audit:
            try:  # a chain that refuses (or a database that fails) never stops the start:
                app.audit.recover_intents()  # the server starts NOT_SERVING and says why
            except Exception as exc:
                log.error("audit intents not recovered at start: %s",
                          str(getattr(exc, "message", exc))[:300])
        app.load_client_crls()
        try:
            from keysvc.custody.backup import remove_leftovers, report_restores
            report_restores(app)
            if not backup_ceremony:
                remove_leftovers(app)
        except Exception as exc:
            log.error("restores and backup leftovers not settled at start: %s",
                      type(exc).__name__)
        return app

    def load_client_crls(self) -> bool:
        """Read the client-certificate CRLs (at start, on SIGHUP, every few minutes).
        A failure is audited and never stops the start; False tells the caller to retry
        soon."""
        from keysvc.identity.admission import client_cas
        from keysvc.identity.crls import load_dir
        unreported = getattr(self, "_crl_unreported", [])
        self._crl_unreported: list[tuple[str, str]] = []

        def report(action: str, detail: str) -> None:
            refused = action.endswith("refused")
            try:
                self.audit.append(actor="keysvc", role="", action=action, target=detail,
                                  outcome="ERROR" if refused else "OK",
                                  code="CERTIFICATE_NOT_ACCEPTED" if refused else "OK")
            except Exception:
                # Revocations already remembered are not "new" next time: their event is
                # kept here and written with the next read.
                self._crl_unreported.append((action, detail))
                raise
        for action, detail in unreported:
            try:
                report(action, detail)
            except Exception:
                return False
        try:
            result = load_dir(self.settings.client_crls, client_cas(self),
                              self.roster, report)
        except Exception as exc:
            log.error("client CRLs not read: %s", type(exc).__name__)
            try:
                report("client_crl.refused", f"the CRLs could not be read or remembered "
                                             f"({type(exc).__name__}); retried soon")
            except Exception:
                pass
            return False
        log.info("client CRLs read: %d, refused: %d, new revocations: %d", result.read,
                 result.refused, result.new_serials)
        return True

    def close(self) -> None:
        self.audit.close()
        if self._checker is not None:
            self._checker.close()
        self.partitions.close()
        self.store.close()
