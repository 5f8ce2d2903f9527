"""The roster: enrolled officers, denied keys and remembered CRL revocations, in the HSM.

Who may approve and who is shut out decides everything else, so none of it is a database
row (anyone may write the database) or a file (anyone on the host may change one): it is
one private data object in the admin token, which only a holder of the token's PIN can
write. Each version carries a generation; the newest counts, and a writer that finds
another writer's version of the same generation withdraws its own and fails (two
replicas approving roster changes at once never lose one silently).

Read through a short cache (`refresh_seconds`, one second by default): a change made on
this replica is seen at once, one made on another replica within that time.
"""
from __future__ import annotations

import json
import logging
import random
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from keysvc.errors import KeysvcError, error
from keysvc.hsm import Token
from keysvc.hsm import keys as hk
from keysvc.records.operations import officer_name
from keysvc.store import serialise as st_serialise

log = logging.getLogger("keysvc.identity.roster")

LABEL = "keysvc-roster"


@dataclass(frozen=True)
class Officer:
    fingerprint: str   # SHA-256 of the certificate's public key (SPKI), hex
    name: str          # the display name approvals and the audit trail show


@dataclass(frozen=True)
class Denied:
    fingerprint: str
    reason: str


@dataclass(frozen=True)
class Pending:
    """A change that admits more (an enrolment, a denied key allowed again), written inside
    its approval's transaction but counting only once that approval has committed
    (`confirm`). A crash or rollback leaves it pending, and it is dropped."""
    op_id: str
    kind: str            # ENROLL_OFFICER or ALLOW_CERTIFICATE
    fingerprint: str
    name: str = ""
    at: float = 0.0      # time.time() when written


@dataclass(frozen=True)
class RosterState:
    generation: int = 0
    officers: tuple[Officer, ...] = ()
    denied: tuple[Denied, ...] = ()
    # Serials revoked by a CA's CRL, remembered once seen: deleting a CRL file revokes
    # nothing back. issuer key -> (highest CRL number seen, revoked serials, hex).
    crl: dict[str, tuple[int, frozenset[str]]] = field(default_factory=dict)
    pending: tuple[Pending, ...] = ()

    def pending_for(self, fingerprint: str) -> Pending | None:
        return next((x for x in self.pending if x.fingerprint == fingerprint), None)

    def officer(self, fingerprint: str) -> Officer | None:
        return next((o for o in self.officers if o.fingerprint == fingerprint), None)

    def officer_named(self, name: str) -> Officer | None:
        wanted = officer_name(name)
        return next((o for o in self.officers if officer_name(o.name) == wanted), None)

    def denial(self, fingerprint: str) -> Denied | None:
        return next((d for d in self.denied if d.fingerprint == fingerprint), None)

    def serial_revoked(self, issuer: str, serial: str) -> bool:
        entry = self.crl.get(issuer)
        return entry is not None and serial in entry[1]

    def usable_officers(self) -> list[Officer]:
        return [o for o in self.officers if self.denial(o.fingerprint) is None]

    def encode(self) -> bytes:
        return json.dumps({
            "generation": self.generation,
            "officers": [[o.fingerprint, o.name] for o in self.officers],
            "denied": [[d.fingerprint, d.reason] for d in self.denied],
            "crl": {k: [n, sorted(s)] for k, (n, s) in sorted(self.crl.items())},
            "pending": [[x.op_id, x.kind, x.fingerprint, x.name, x.at] for x in self.pending],
        }, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> "RosterState":
        d = json.loads(data)
        return cls(int(d["generation"]),
                   tuple(Officer(f, n) for f, n in d["officers"]),
                   tuple(Denied(f, r) for f, r in d["denied"]),
                   {k: (int(n), frozenset(s)) for k, (n, s) in d.get("crl", {}).items()},
                   tuple(Pending(o, k, f, n, float(a)) for o, k, f, n, a in d.get("pending", [])))


def merge(states: list[RosterState]) -> RosterState:
    """Two versions of one generation (writers raced): the one that admits least. Denials
    and CRL revocations of either count; an officer only if both have them."""
    if len(states) == 1:
        return states[0]
    first = states[0]
    officers = tuple(o for o in first.officers if all(o in st.officers for st in states))
    denied: dict[str, Denied] = {}
    crl: dict[str, tuple[int, frozenset[str]]] = {}
    for st in states:
        for d in st.denied:
            denied.setdefault(d.fingerprint, d)
        for k, (n, serials) in st.crl.items():
            old_n, old = crl.get(k, (0, frozenset()))
            crl[k] = (max(n, old_n), old | serials)
    pending = tuple(x for x in first.pending if all(x in st.pending for st in states))
    return RosterState(first.generation, officers, tuple(denied.values()), crl, pending)


class Roster:
    def __init__(self, token: Token, refresh_seconds: float = 1.0, store: Any = None) -> None:
        self.token = token
        self.store = store
        self.refresh_seconds = refresh_seconds
        self._lock = threading.Lock()
        self._cached: RosterState | None = None
        self._read_at = 0.0

    def exists(self) -> bool:
        with self.token.session() as s:
            return bool(hk.data_values(s, LABEL))

    def current(self) -> RosterState:
        """The newest roster, at most `refresh_seconds` old. If the token cannot be read,
        the call fails (HSM_UNAVAILABLE): a stale roster could admit a revoked caller."""
        now = time.monotonic()
        cached = self._cached
        if cached is not None and now - self._read_at < self.refresh_seconds:
            return cached
        with self._lock:
            if self._cached is not None and time.monotonic() - self._read_at < \
                    self.refresh_seconds:
                return self._cached
            state = self._read()
            self._cached, self._read_at = state, time.monotonic()
            return state

    def _read(self) -> RosterState:
        with self.token.session() as s:
            values = hk.data_values(s, LABEL)
        states = [RosterState.decode(v) for v in values]
        top = max((st.generation for st in states), default=0)
        return merge([st for st in states if st.generation == top]) if states \
            else RosterState()

    def seed(self, officers: list[Officer]) -> bool:
        """The first officers, written only if the token has no roster yet (so files on
        the host cannot add an officer later). Returns whether it wrote. Replicas starting
        together may race: the loser finds the winner's roster on its next look."""
        for attempt in range(10):
            if self.exists():
                return False
            try:
                self.change(lambda st: st if st.generation else
                            replace(st, officers=tuple(officers)))
                return True
            except KeysvcError as exc:
                if exc.code != "ROSTER_BUSY":
                    raise
                time.sleep(0.05 * (attempt + 1) * random.random())
        raise error("ROSTER_BUSY", "the first officers could not be written")

    def change(self, how: Callable[[RosterState], RosterState], conn: Any = None
               ) -> RosterState:
        """Write `how(newest)` as the next generation; older versions go afterwards.

        Writers queue on a database lock (`conn`'s transaction, or one of their own), so
        replicas take turns; that lock is only for order: if a database writer breaks it,
        two versions of one generation are merged the safe way (`merge`), and a writer that
        finds a rival withdraws and fails (ROSTER_BUSY)."""
        if conn is None and self.store is not None:
            with self.store.tx() as own:
                return self.change(how, own)
        if conn is not None:
            st_serialise(conn, "keysvc-roster")
        with self._lock:
            old = self._read()
            new = replace(how(old), generation=old.generation + 1)
            data = new.encode()
            with self.token.session() as s:
                hk.put_data(s, LABEL, data)
                rivals = [v for v in hk.data_values(s, LABEL)
                          if v != data and RosterState.decode(v).generation >= new.generation]
                if rivals:
                    hk.destroy_data(s, LABEL, lambda v: v == data)
                    raise error("ROSTER_BUSY", "another change to the officers or the deny "
                                               "list was written at the same moment; retry")
                hk.destroy_data(s, LABEL, lambda v: RosterState.decode(v).generation
                                < new.generation)
            self._cached, self._read_at = new, time.monotonic()
            return new

    def forget_cache(self) -> None:
        self._cached = None
