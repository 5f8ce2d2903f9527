"""The audit chain's events: what is hashed, what is MACed, how an event is written out.

Each event hashes its predecessor (`prev_hash`) and the hash is MACed with a key that
never leaves the admin token, so nobody with the database alone can insert, edit, reorder
or rewrite events consistently.
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass

GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditEvent:
    id: str
    time: dt.datetime
    actor: str
    role: str
    action: str
    target: str
    outcome: str
    code: str
    sequence: int = 0


@dataclass(frozen=True)
class Chained:
    """An event at its place in the chain."""
    event: AuditEvent
    prev_hash: str
    hash: str
    mac: str


@dataclass(frozen=True)
class Verification:
    intact: bool
    events_checked: int
    first_bad_event_id: str = ""  # an event's id, or "" when events are missing at the end
    detail: str = ""


def utc_text(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(seq: int, e: AuditEvent, prev_hash: str) -> bytes:
    fields = [str(seq), e.id, utc_text(e.time), e.actor, e.role, e.action, e.target,
              e.outcome, e.code, prev_hash]
    return "\x1f".join(f.replace("\x1f", " ") for f in fields).encode()


def event_json(e: AuditEvent) -> str:
    """An event not yet chained (an intent), as stored."""
    d = asdict(e)
    d["time"] = utc_text(e.time)
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


_TEXT_FIELDS = ("id", "actor", "role", "action", "target", "outcome", "code")


def event_from_json(text: str) -> AuditEvent:
    """An intent's event; ValueError for anything that is not exactly one."""
    d = json.loads(text)
    if not isinstance(d, dict) or set(d) != {*_TEXT_FIELDS, "time", "sequence"} \
            or not all(isinstance(d[k], str) for k in (*_TEXT_FIELDS, "time")):
        raise ValueError("not an audit event")
    d["time"] = dt.datetime.strptime(d["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=dt.timezone.utc)
    d["sequence"] = 0
    return AuditEvent(**d)


def line(c: Chained | None, e: AuditEvent | None = None) -> dict:
    """One sink line: the event with its sequence, hash and MAC (so that the sink can be
    checked against the database chain); an event that could not be chained has none."""
    ev = c.event if c is not None else e
    assert ev is not None
    out = {"seq": ev.sequence if c is not None else None, "id": ev.id,
           "time": utc_text(ev.time), "actor": ev.actor, "role": ev.role,
           "action": ev.action, "target": ev.target, "outcome": ev.outcome, "code": ev.code}
    if c is not None:
        out.update(prev_hash=c.prev_hash, hash=c.hash, mac=c.mac)
    else:
        out["unchained"] = True
    return out


def row_chained(r) -> Chained:
    t = r.time if r.time.tzinfo else r.time.replace(tzinfo=dt.timezone.utc)
    return Chained(AuditEvent(id=r.id, time=t, actor=r.actor, role=r.role, action=r.action,
                              target=r.target, outcome=r.outcome, code=r.code,
                              sequence=r.seq), r.prev_hash, r.hash, r.mac)


def row_event(r) -> AuditEvent:
    return row_chained(r).event
