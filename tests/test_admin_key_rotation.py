"""Versions of the admin token's MAC keys (issue 15): audit-mac and escrow-seal rotate
under dual control like the storage keys.

- audit-mac: each event's MAC names its version; events are never MACed again, and no event
  may name an older version than one before it, so an old version cannot add to the chain
  after a rotation. A version is destroyed only when no event names it.
- escrow-seal: each record names its version inside its seal; the rewrap job seals every
  record again under the primary; an old version is destroyed once no record uses it.
- record-seal does not rotate (every sealed record of every kind would have to be sealed
  again).
"""
from __future__ import annotations

import datetime as dt
import json
import sqlite3
import subprocess
import sys
import time

import grpc
import pytest

from keysvc.api.v1 import keysvc_pb2 as pb
from keysvc.client import error_reason
from tests.serverproc import ROOT, start_server
from tests.support import encoder
from tests.test_custody import _softhsm_env, token_objects
from tests.test_rotation import _dual, backup, rotate


def _date(d: dt.date) -> pb.Date:
    return pb.Date(year=d.year, month=d.month, day=d.day)


def admin_versions(srv, key: str) -> dict[int, tuple[bool, int]]:
    """version -> (primary, what uses it) of an admin key."""
    r = srv.as_("security-officer-1").admin.ListKeyVersions(
        pb.ListKeyVersionsRequest(partition="admin"))
    return {v.version: (v.primary, v.stored_keys) for v in r.versions if v.key == key}


def destroy(srv, key: str, version: int):
    return _dual(srv, lambda a: a.DestroyKeyVersion, pb.DestroyKeyVersionRequest(
        partition="admin", key=key, version=version))


def release(srv, chf: str):
    return srv.as_("s1sp").s1sp.ReleaseRollbackCertificates(
        pb.ReleaseRollbackCertificatesRequest(chf_identifier=chf, reason="rotation test"))


def db(srv) -> sqlite3.Connection:
    return sqlite3.connect(srv.state_dir / "keysvc.db")


def escrow_row(srv, eid: str) -> tuple:
    with db(srv) as c:
        return c.execute("SELECT seal, seal_version, releases FROM escrows WHERE id = ?",
                         (eid,)).fetchone()


def put_escrow_row(srv, eid: str, row: tuple) -> None:
    with db(srv) as c:
        c.execute("UPDATE escrows SET seal = ?, seal_version = ?, releases = ? WHERE id = ?",
                  (*row, eid))


def verify(srv) -> pb.VerifyAuditLogResponse:
    return srv.as_("auditor").audit.VerifyAuditLog(pb.VerifyAuditLogRequest())


def serve(work):
    """A development server whose rewrap job runs (and seals escrows again)."""
    factory = encoder.DeviceCertificateFactory()
    (work / "ca.pem").write_bytes(factory.ca_pem)
    srv = start_server(work / "server", trust_anchors=[work / "ca.pem"],
                       env={"KEYSVC_REWRAP_ROWS_PER_SECOND": "3000"})
    return srv, factory


def escrow(srv, factory) -> tuple[str, str]:
    """A new escrow record, released from two days ago to two days on: (id, CHF)."""
    inst = encoder.random_installations(1, cert_factory=factory)[0]
    today = dt.date.today()
    eid = srv.as_("security-officer-1").admin.EscrowRollbackCertificates(
        pb.EscrowRollbackCertificatesRequest(
            smso_id="SMSO-A", group_id="EA", chf_identifiers=[inst.chf],
            certificates=[inst.certificate_der],
            valid_from=_date(today - dt.timedelta(days=2)),
            valid_to=_date(today + dt.timedelta(days=2)))).escrow_id
    return eid, inst.chf


def refused_with(rotated, row: tuple) -> None:
    """The escrow row replaced by `row` (seal, seal_version, releases) is refused as
    altered, and put back after."""
    srv, eid = rotated["srv"], rotated["eid"]
    current = escrow_row(srv, eid)
    put_escrow_row(srv, eid, row)
    try:
        with pytest.raises(grpc.RpcError) as e:
            release(srv, rotated["chf"])
        assert error_reason(e.value) == "ESCROW_SEAL_INVALID"
    finally:
        put_escrow_row(srv, eid, current)


@pytest.fixture(scope="module")
def rotated(tmp_path_factory):
    srv, factory = serve(tmp_path_factory.mktemp("admin-rotation"))
    eid, chf = escrow(srv, factory)
    old_escrow = escrow_row(srv, eid)  # sealed under escrow-seal version 1
    ops = {k: rotate(srv, "admin", k) for k in ("audit-mac", "escrow-seal")}
    deadline = time.monotonic() + 60
    while admin_versions(srv, "escrow-seal").get(1, (0, 1))[1] and time.monotonic() < deadline:
        time.sleep(0.5)
    yield {"srv": srv, "eid": eid, "chf": chf, "old_escrow": old_escrow, "ops": ops}
    srv.stop()


def test_audit_mac_rotation_makes_version_2_primary_and_new_events_name_it(rotated):
    srv = rotated["srv"]
    op = rotated["ops"]["audit-mac"]
    assert op.state == pb.Operation.APPROVED and "version 2" in op.message, op.message
    assert {v: p for v, (p, _) in admin_versions(srv, "audit-mac").items()} == {1: False, 2: True}
    verify(srv)  # one more event, chained now
    with db(srv) as c:
        macs = [m for (m,) in c.execute("SELECT mac FROM audit_events ORDER BY seq")]
    assert not macs[0].startswith("v") and macs[-1].startswith("v2:")
    # versions never go back along the chain
    named = [int(m[1:m.index(":")]) if m.startswith("v") else 1 for m in macs]
    assert named == sorted(named)


def test_the_audit_log_verifies_across_the_rotation(rotated):
    r = verify(rotated["srv"])
    assert r.intact, r.detail


def test_audit_mac_versions_are_never_destroyed(rotated):
    """Events are never deleted, and VerifyAuditLog needs every version that MACed them."""
    srv = rotated["srv"]
    assert admin_versions(srv, "audit-mac")[1][1] > 0  # what ListKeyVersions shows
    with pytest.raises(grpc.RpcError) as e:
        srv.as_("security-officer-1").admin.DestroyKeyVersion(pb.DestroyKeyVersionRequest(
            partition="admin", key="audit-mac", version=1))
    assert error_reason(e.value) == "KEY_VERSION_IN_USE"
    assert "never destroyed" in e.value.details()


def test_escrows_are_sealed_again_under_the_primary_escrow_seal_version(rotated):
    srv = rotated["srv"]
    assert rotated["ops"]["escrow-seal"].state == pb.Operation.APPROVED
    assert admin_versions(srv, "escrow-seal") == {1: (False, 0), 2: (True, 1)}
    seal, version, _ = escrow_row(srv, rotated["eid"])
    assert version == 2 and seal != rotated["old_escrow"][0]
    assert release(srv, rotated["chf"]).certificates
    events = srv.as_("auditor").audit.ListAuditEvents(pb.ListAuditEventsRequest(
        action="custody.rewrap", page_size=100)).events
    assert any("escrow records sealed again under escrow-seal v2" in e.target for e in events)


def test_an_escrow_copy_sealed_under_the_old_version_put_back_is_refused(rotated):
    """An older, validly sealed copy (version 1) is not the record's anchored seal."""
    refused_with(rotated, rotated["old_escrow"])


def test_a_seal_version_that_is_not_a_version_is_an_altered_record(rotated):
    current = escrow_row(rotated["srv"], rotated["eid"])
    refused_with(rotated, (current[0], "two", current[2]))


def test_an_unused_escrow_seal_version_is_destroyed_once_backed_up(rotated):
    srv = rotated["srv"]
    with pytest.raises(grpc.RpcError) as e:
        srv.as_("security-officer-1").admin.DestroyKeyVersion(pb.DestroyKeyVersionRequest(
            partition="admin", key="escrow-seal", version=1))
    assert error_reason(e.value) == "VERSION_NOT_BACKED_UP"
    backup(srv, "admin")
    op = destroy(srv, "escrow-seal", 1)
    assert op.state == pb.Operation.APPROVED, op.message
    labels = token_objects(srv.state_dir, "admin")
    assert "escrow-seal" not in labels and "escrow-seal@v2" in labels
    assert release(srv, rotated["chf"]).certificates


def test_an_escrow_naming_a_destroyed_version_is_refused_as_altered(rotated):
    """The version-1 copy put back after version 1 is gone: refused, never INTERNAL."""
    refused_with(rotated, rotated["old_escrow"])


def test_the_record_seal_does_not_rotate(rotated):
    with pytest.raises(grpc.RpcError) as e:
        rotated["srv"].as_("security-officer-1").admin.RotateKey(pb.RotateKeyRequest(
            partition="admin", key="record-seal"))
    assert error_reason(e.value) == "INVALID_REQUEST"


def test_after_a_restart_the_log_verifies_and_the_escrow_releases(rotated):
    srv = rotated["srv"]
    assert srv.stop() == 0
    again = start_server(srv.state_dir)
    rotated["srv"] = again
    r = verify(again)
    assert r.intact, r.detail
    assert release(again, rotated["chf"]).certificates


FORGE = """
import hashlib, json, sqlite3, sys, uuid, datetime as dt
from pathlib import Path
import pkcs11
from keysvc.audit.chain import AuditEvent, canonical
from keysvc.config import Settings
state = Path(sys.argv[1])
pin = (state / "hsm/pins/admin.pin").read_text().strip()
with sqlite3.connect(state / "keysvc.db") as c:
    seq, prev = c.execute("SELECT seq, hash FROM audit_head").fetchone()
    seq += 1
    e = AuditEvent(id=str(uuid.uuid4()), time=dt.datetime.now(dt.timezone.utc), actor="forger",
                   role="", action="forged", target="", outcome="OK", code="OK")
    digest = hashlib.sha256(canonical(seq, e, prev)).hexdigest()
    lib = pkcs11.lib(Settings().pkcs11_module)
    with lib.get_token(token_label="keysvc-admin").open(user_pin=pin) as s:
        key = s.get_key(label="audit-mac")  # version 1: stolen, say, before the rotation
        mac = key.sign(bytes.fromhex(digest), mechanism=pkcs11.Mechanism.SHA256_HMAC).hex()
    c.execute("INSERT INTO audit_events (seq, id, time, actor, role, action, target, outcome,"
              " code, prev_hash, hash, mac) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
              (seq, e.id, e.time.isoformat(sep=" "), e.actor, e.role, e.action, e.target,
               e.outcome, e.code, prev, digest, mac))
    c.execute("UPDATE audit_head SET seq = ?, hash = ?", (seq, digest))
print(seq)
"""


def test_an_event_macd_under_an_older_audit_mac_version_after_a_newer_one_is_refused(rotated):
    """Someone who holds audit-mac version 1 (say, stolen before the rotation) appends an
    event with a valid hash, link and version-1 MAC: VerifyAuditLog names it. (Last: it
    leaves the chain broken.)"""
    srv = rotated["srv"]
    seq = int(subprocess.run([sys.executable, "-c", FORGE, str(srv.state_dir)], cwd=ROOT,
                             env=_softhsm_env(srv.state_dir), capture_output=True, text=True,
                             check=True).stdout)
    r = verify(srv)
    assert not r.intact
    assert "audit-mac version" in r.detail and f"event {seq} " in r.detail, r.detail
    with db(srv) as c:
        assert json.dumps(c.execute("SELECT actor FROM audit_events WHERE seq = ?",
                                    (seq,)).fetchone()) == '["forger"]'
