"""Officers and the deny list, changed under dual control (KeyAdministrationService).

Enrolling or removing an officer, and denying or allowing again a certificate key, are
operations like a key import: requested by one officer, carried out when the quorum has
approved the request it shows. Their effect is a new version of the roster in the admin
token (`keysvc/identity/roster.py`), written inside the approval's transaction; writing
the same roster again is harmless, so an approval whose commit failed is simply approved
again.

Decisions:
- an officer is the SHA-256 of a certificate's public key; a renewed certificate with the
  same key stays enrolled, one with a new key is a new enrolment;
- display names are unique without case or spaces, so no two officers read alike;
- removing an officer is refused if fewer officers than the quorum would be left (nobody
  could approve anything again); denying one is allowed (a stolen key must be stoppable)
  but the request warns;
- an approval counts only while its officer is enrolled and not denied: a revoked
  officer's pending approvals stop counting.
"""
from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable

from keysvc.errors import KeysvcError, error
from keysvc.identity.admission import client_cas, officer_from_pem
from keysvc.identity.caller import Caller
from keysvc.identity.roster import Denied, Officer, RosterState
from keysvc.identity.roster import Pending as RosterPending
from keysvc.records.operations import Approval, OperationRecord, officer_name

if TYPE_CHECKING:
    from keysvc.app import App
    from keysvc.keyadmin import Operation

log = logging.getLogger("keysvc.officers")

KINDS = ("ENROLL_OFFICER", "REMOVE_OFFICER", "DENY_CERTIFICATE", "ALLOW_CERTIFICATE")
PARTITION = "admin"


def partition_of_roster_ops(app: App) -> str:
    """Where this process's roster operations live: the admin partition, or, in a process
    of one organisation, that organisation's own partition, so that their requests and
    approvals are sealed and anchored by a token only that organisation opens (the admin
    record-seal is shared trust in a split deployment: the other side could forge them)."""
    return app.vouched.partition or PARTITION
FINGERPRINT = re.compile(r"[0-9a-f]{64}")
# A reason an approver reads: printable ASCII, no control character.
REASON = re.compile(r"[ -~]{0,256}")
MAX_CERTIFICATE_PEM = 16 * 1024


def _new(app: App, caller: Caller, kind: str, target: str, payload: dict) -> Operation:
    from keysvc import keyadmin
    with app.store.engine.connect() as conn:
        pending = app.records.operations.pending_for(conn, target, list(KINDS))
    if pending:
        raise error("OFFICER_EXISTS", f"operation {pending} already waits on {target!r}")
    return keyadmin._new_operation(app, caller, "op-" + uuid.uuid4().hex[:16], kind, target,
                                   partition_of_roster_ops(app), payload)


def _fingerprint(value: str) -> str:
    fp = value.strip().lower().replace(":", "")
    if not FINGERPRINT.fullmatch(fp):
        raise error("INVALID_REQUEST", "fingerprint is the SHA-256 of the certificate's "
                    "public key (SPKI): 64 hex digits", field="fingerprint")
    return fp


def enroll_officer(app: App, caller: Caller, certificate_pem: str,
                   display_name: str = "") -> Operation:
    if not certificate_pem or len(certificate_pem) > MAX_CERTIFICATE_PEM:
        raise error("INVALID_REQUEST", "certificate_pem is the officer's certificate, PEM, "
                    f"at most {MAX_CERTIFICATE_PEM} characters", field="certificate_pem")
    officer = officer_from_pem(certificate_pem.encode(), client_cas(app), display_name)
    roster = app.roster.current()
    _check_enrollable(roster, officer.fingerprint, officer.name)
    from cryptography import x509
    subject = x509.load_pem_x509_certificate(certificate_pem.encode()).subject.rfc4514_string()
    return _new(app, caller, "ENROLL_OFFICER", officer.name,
                {"name": officer.name, "fingerprint": officer.fingerprint,
                 "certificate_subject": subject[:256]})


def _check_enrollable(roster: RosterState, fp: str, name: str) -> None:
    if any(x.kind == "ENROLL_OFFICER" and (x.fingerprint == fp or
                                           officer_name(x.name) == officer_name(name))
           for x in roster.pending):
        raise error("OFFICER_EXISTS", "an enrolment of that key or name waits to commit")
    enrolled = roster.officer(fp)
    if enrolled is not None:
        raise error("OFFICER_EXISTS", f"that key is enrolled as {enrolled.name}")
    if roster.officer_named(name) is not None:
        raise error("OFFICER_EXISTS", "an officer of that name (ignoring case and spaces) "
                                      "is enrolled")
    if roster.denial(fp) is not None:
        raise error("CERTIFICATE_REVOKED", "that key is on the deny list")


def remove_officer(app: App, caller: Caller, display_name: str) -> Operation:
    roster = app.roster.current()
    officer = roster.officer_named(display_name[:64])
    if officer is None:
        raise error("OFFICER_NOT_FOUND", f"no enrolled officer {display_name[:64]!r}")
    _check_quorum_kept(app, roster, officer.fingerprint)
    return _new(app, caller, "REMOVE_OFFICER", officer.name,
                {"name": officer.name, "fingerprint": officer.fingerprint})


def _check_quorum_kept(app: App, roster: RosterState, fp: str) -> None:
    left = [o for o in roster.usable_officers()
            if o.fingerprint != fp and app.vouched.counts(o.fingerprint)]
    if len(left) < app.settings.quorum:
        raise error("OFFICERS_BELOW_QUORUM", f"removing that officer would leave {len(left)} "
                    f"usable officers, fewer than the quorum of {app.settings.quorum}; "
                    "enrol another officer first")


def deny_certificate(app: App, caller: Caller, fingerprint: str, reason: str) -> Operation:
    fp = _fingerprint(fingerprint)
    if not REASON.fullmatch(reason):
        raise error("INVALID_REQUEST", "reason is up to 256 printable ASCII characters",
                    field="reason")
    if app.roster.current().denial(fp) is not None:
        raise error("OFFICER_EXISTS", "that key is already on the deny list")
    return _new(app, caller, "DENY_CERTIFICATE", fp, {"fingerprint": fp, "reason": reason})


def allow_certificate(app: App, caller: Caller, fingerprint: str) -> Operation:
    fp = _fingerprint(fingerprint)
    if app.roster.current().denial(fp) is None:
        raise error("OFFICER_NOT_FOUND", "that key is not on the deny list")
    return _new(app, caller, "ALLOW_CERTIFICATE", fp, {"fingerprint": fp})


def list_roster(app: App) -> RosterState:
    return app.roster.current()


# --------------------------------------------------------------------------- approval
def counts(app: App, approval: Approval) -> bool:
    """Does this approval still count? Only while its officer is enrolled and not denied,
    and the certificate it was made with is not revoked by a CRL. An approval without a
    key came from no certificate and never counts."""
    if not approval.key:
        return False
    roster = app.roster.current()
    if approval.cert:
        issuer, _, serial = approval.cert.partition(":")
        if roster.serial_revoked(issuer, serial):
            return False
    return (roster.officer(approval.key) is not None and roster.denial(approval.key) is None
            and app.vouched.counts(approval.key))  # one organisation's process: its own


class _Unchanged(Exception):
    """Raised inside a roster change: nothing to write (already so, or refused)."""

    def __init__(self, state: str, message: str = "", code: str = "") -> None:
        super().__init__(message)
        self.result = (state, message, code)


def execute(app: App, conn: Any, op: OperationRecord, p: dict,
            pending: list[RosterPending]) -> tuple[str, str, str]:
    """Carry out an approved roster change: (state, message, refusal code or ""). Every
    check runs again on the newest roster, inside the change, so two approvals on two
    replicas cannot both pass a check that only one may (two removals below the quorum).

    A change that admits less (a removal, a denial) counts at once: if its approval then
    fails to commit, it stays, and approving again changes nothing more. A change that
    admits more (an enrolment, an allowance) is written as pending and counts only once its
    approval has committed (`settle`, given `pending`); a rollback or a crash drops it."""
    fp = p["fingerprint"]

    def how(st: RosterState) -> RosterState:
        # An earlier try of this same approval may have left its pending entry (its settle
        # failed): it is this operation's own, and gives way to this try.
        st = replace(st, pending=tuple(x for x in st.pending if x.op_id != op.id))
        if op.kind == "ENROLL_OFFICER":
            mine = st.officer(fp)
            if mine is not None and mine.name == p["name"]:
                _vouch(app, op, fp, True)
                raise _Unchanged("APPROVED", "already enrolled")
            _refused_unless(lambda: _check_enrollable(st, fp, p["name"]))
            return replace(st, pending=(*st.pending, RosterPending(
                op.id, op.kind, fp, p["name"], time.time())))
        if op.kind == "REMOVE_OFFICER":
            if st.officer(fp) is None:
                _vouch(app, op, fp, False)
                raise _Unchanged("APPROVED", "already removed")
            _refused_unless(lambda: _check_quorum_kept(app, st, fp))
            return replace(st, officers=tuple(o for o in st.officers if o.fingerprint != fp))
        if op.kind == "DENY_CERTIFICATE":
            _vouch(app, op, fp, False)
            if st.denial(fp) is not None:
                raise _Unchanged("APPROVED", "already denied")
            return replace(st, denied=(*st.denied, Denied(fp, p["reason"])))
        if st.denial(fp) is None:  # ALLOW_CERTIFICATE
            raise _Unchanged("APPROVED", "not denied")
        if st.pending_for(fp) is not None:
            raise _Unchanged("REJECTED", "another change of that key waits to commit",
                             "ROSTER_BUSY")
        return replace(st, pending=(*st.pending, RosterPending(op.id, op.kind, fp, "",
                                                               time.time())))

    try:
        written = app.roster.change(how, conn)
    except _Unchanged as done:
        return done.result
    if op.kind in ("ENROLL_OFFICER", "ALLOW_CERTIFICATE"):
        pending.append(next(x for x in written.pending if x.op_id == op.id))
    if op.kind in ("ENROLL_OFFICER", "REMOVE_OFFICER"):
        _vouch(app, op, fp, op.kind == "ENROLL_OFFICER")
    return "APPROVED", "", ""


def _vouch(app: App, op: OperationRecord, fp: str, enrolled: bool) -> None:
    """One organisation's process vouches (its own token) for the officers it enrols, and
    stops for those it removes or denies (keysvc/identity/vouched.py). Only an operation of
    its own partition vouches: one in the admin partition may be forged by the other side.
    Withdrawing is always done. Nothing else withdraws: what the other side does to the
    shared roster (a removal, a denial, a lost roster) must not end this organisation's
    vouches for good; its own removals and denials are operations of its own partition,
    executed here."""
    if not enrolled:
        app.vouched.remove(fp)
    elif op.partition == app.vouched.partition:
        app.vouched.add(fp)


def settle(app: App, op_id: str, written: RosterPending | None = None) -> str:
    """A pending roster change counts if its operation is (verifiably) APPROVED, and is
    dropped otherwise. Decided inside the roster change, under its lock. Returns what was
    done ("confirmed", "dropped" or ""). `written`: the entry this process wrote, given
    right after its approval: if another replica's sweep dropped it meanwhile (an approval
    slower than the sweep's wait), an APPROVED operation still takes effect."""
    done = {"what": ""}

    def how(st: RosterState) -> RosterState:
        mine = next((x for x in st.pending if x.op_id == op_id), None) or written
        if mine is None:
            raise _Unchanged("", "")
        rest = tuple(x for x in st.pending if x.op_id != op_id)
        # The token's word on the operation, not the database's: a row a database writer
        # alters cannot turn a quorum-approved change into a dropped one, nor the reverse.
        anchored = [app.records.operations.anchored_state(op_id, p)
                    for p in dict.fromkeys((partition_of_roster_ops(app), PARTITION))]
        if app.vouched.applies and all(s is None for s in anchored):
            raise _Unchanged("", "")  # maybe the other organisation's: its process settles
        state = next((s for s in anchored if s is not None), None)
        if state != "APPROVED":
            if not any(x.op_id == op_id for x in st.pending):
                raise _Unchanged("", "")  # nothing pending, nothing approved: nothing to do
            done["what"] = "dropped"
            return replace(st, pending=rest)
        done["what"] = "confirmed"
        if mine.kind == "ENROLL_OFFICER":
            if st.officer(mine.fingerprint) is not None or st.officer_named(mine.name):
                return replace(st, pending=rest)
            return replace(st, pending=rest,
                           officers=(*st.officers, Officer(mine.fingerprint, mine.name)))
        return replace(st, pending=rest, denied=tuple(
            d for d in st.denied if d.fingerprint != mine.fingerprint))

    try:
        app.roster.change(how)
    except _Unchanged:
        return ""
    try:
        app.audit.append(actor="keysvc", role="", action=f"roster.change_{done['what']}",
                         target=op_id, outcome="OK" if done["what"] == "confirmed" else "ERROR",
                         code="OK" if done["what"] == "confirmed" else "APPROVAL_REQUIRED")
    except Exception as exc:  # the roster is right; the event is what is missing
        log.error("roster change %s %s, not audited: %s", op_id, done["what"],
                  type(exc).__name__)
    return done["what"]


def settle_stale(app: App, older_than: float = 60.0) -> int:
    """At start and periodically: pending changes left by a crash are settled."""
    now = time.time()
    stale = [x.op_id for x in app.roster.current().pending if now - x.at >= older_than]
    # (settle only from the roster here: `written` is for the approving process alone)
    settled = 0
    for op_id in stale:
        try:
            settled += bool(settle(app, op_id))
        except Exception as exc:  # one that cannot be settled now stops no other
            log.error("roster change %s not settled: %s", op_id[:64], type(exc).__name__)
    return settled


def _refused_unless(check: Callable[[], None]) -> None:
    try:
        check()
    except KeysvcError as exc:
        raise _Unchanged("REJECTED", exc.message, exc.code) from None


def view(app: App, op: OperationRecord, view: dict, warnings: list[str]) -> None:
    """What an approver sees of a roster change, and what to look at twice."""
    p = op.request
    roster = app.roster.current()
    view.update(officer_name=p.get("name", ""), fingerprint=p.get("fingerprint", ""),
                certificate_subject=p.get("certificate_subject", ""),
                reason=p.get("reason", ""))
    fp = view["fingerprint"]
    if op.kind == "ENROLL_OFFICER":
        warnings.append("a new officer: from approval on, this key counts towards the "
                        "quorum of every operation")
    elif op.kind == "DENY_CERTIFICATE":
        officer = roster.officer(fp)
        if officer is not None:
            left = len([o for o in roster.usable_officers() if o.fingerprint != fp])
            warnings.append(f"the key of officer {officer.name}: {left} usable officers "
                            "would be left" + (f", fewer than the quorum of "
                                               f"{app.settings.quorum}: nothing could be "
                                               "approved any more"
                                               if left < app.settings.quorum else ""))
    elif op.kind == "ALLOW_CERTIFICATE":
        warnings.append("a denied key is allowed to call again")
