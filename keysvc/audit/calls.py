"""One call's audit: the event written in the transaction of each effect it commits.

The interceptor opens a `CallAudit` for every call and sets `store.before_commit` to it.
Each write transaction the call makes then also inserts the call's event into
`audit_intents` and reads it back before committing, so an effect never commits without
its event (a trigger that drops the insert rolls the effect back). Once the call ends, its
committed intents, and an event for its outcome if it failed or changed nothing, go to the
writer, and the call returns only when they are chained and in every sink.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Callable

from sqlalchemy import select
from sqlalchemy.engine import Connection

from keysvc import store as st
from keysvc.audit.chain import AuditEvent, event_json
from keysvc.clock import Clock
from keysvc.errors import error


@dataclass
class CallAudit:
    actor: str
    role: str
    action: str
    clock: Clock
    target: Callable[[], str]
    seal: Callable[[str], str]     # the intent's MAC, in the HSM (AuditLog.intent_mac)
    committed: list[AuditEvent] = field(default_factory=list)

    def event(self, outcome: str, code: str) -> AuditEvent:
        return AuditEvent(id=str(uuid.uuid4()), time=self.clock(), actor=self.actor,
                          role=self.role, action=self.action, target=self.target()[:512],
                          outcome=outcome, code=code)

    def before_commit(self, conn: Connection) -> Callable[[], None]:
        """Write this call's event into `conn`'s transaction (store.before_commit)."""
        e = self.event("OK", "OK")
        text = event_json(e)
        conn.execute(st.audit_intents.insert().values(
            id=e.id, created_at=e.time,
            event=json.dumps({"event": text, "mac": self.seal(text)})))
        if conn.execute(select(st.audit_intents.c.id).where(
                st.audit_intents.c.id == e.id)).first() is None:
            raise error("AUDIT_UNAVAILABLE", "the database did not keep the call's audit "
                                             "event; the change was rolled back")
        return lambda: self.committed.append(e)

    def events(self, outcome: str, code: str) -> tuple[list[AuditEvent], AuditEvent | None]:
        """(committed intents, the outcome's own event or None)."""
        if self.committed and outcome == "OK":
            return self.committed, None
        final = self.event(outcome, code)
        return self.committed, final
