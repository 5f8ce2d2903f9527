"""The admin token's key versions against a database writer (issue 15, from the review of
audit-mac and escrow-seal rotation): what the database says about versions is never
enough to destroy one, to stop the audit trail, or to hide an altered row.

Each test runs its own server (development set-up, SQLite) and writes its database as an
attacker would.
"""
from __future__ import annotations

import time
import uuid

import grpc
import pytest

from keysvc.api.v1 import keysvc_pb2 as pb
from keysvc.client import error_reason
from keysvc.custody.versions import untagged
from tests.serverproc import start_server
from tests.test_admin_key_rotation import (
    admin_versions,
    db,
    destroy,
    escrow,
    release,
    serve,
    verify,
)
from tests.test_custody import keysvc
from tests.test_rotation import backup, rotate


def reason(fn) -> str:
    try:
        fn()
    except grpc.RpcError as e:
        return error_reason(e) or e.code().name
    return "OK"


def wait(pred, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.3)
    return bool(pred())


def seal_version(srv, eid: str):
    with db(srv) as c:
        return c.execute("SELECT seal_version FROM escrows WHERE id = ?", (eid,)).fetchone()[0]


@pytest.fixture
def server(tmp_path):
    srv, factory = serve(tmp_path)
    yield srv, factory
    srv.stop()


def test_a_version_1_mac_has_one_spelling():
    mac = bytes(range(32))
    assert untagged(mac.hex()) == (1, mac)
    assert untagged("v2:" + mac.hex()) == (2, mac)
    for alias in ("v1:" + mac.hex(), "v01:" + mac.hex(), "V2:" + mac.hex(),
                  mac.hex().upper(), "v2:" + mac.hex()[:-2], mac.hex() + "\n",
                  "v2:" + mac.hex() + "\n"):
        with pytest.raises(ValueError):
            untagged(alias)


def test_a_version_the_database_names_rereads_the_token_once_a_minute_at_most(app,
                                                                            monkeypatch):
    """Reading the token again re-initialises the module (long calls in flight start over):
    a forged version must not make every call do it. Only the version after the primary
    is looked for, and a version still missing is not looked for again for a minute."""
    from keysvc.custody import versions
    from keysvc.partitions import ESCROW_SEAL_KEY
    token = app.partitions.admin
    reads = []
    monkeypatch.setattr(token, "refresh", lambda: reads.append(1))
    monkeypatch.setattr(versions, "_missing", {})
    for _ in range(20):
        versions.see(token, ESCROW_SEAL_KEY, 99)   # far past the primary (1): never
    assert reads == []
    for _ in range(20):
        versions.see(token, ESCROW_SEAL_KEY, 2)    # the next one: once, then it waits
    assert reads == [1]
    versions.see(token, ESCROW_SEAL_KEY, 1)        # one the token shows: nothing to do
    assert reads == [1]


def test_audit_mac_versions_are_never_destroyed_whatever_the_database_counts(server):
    """A writer respelling every version-1 MAC as "v1:<hex>" made the count 0: the alias is
    not a MAC (VerifyAuditLog names the first), and no count can destroy a version."""
    srv, _ = server
    assert rotate(srv, "admin", "audit-mac").state == pb.Operation.APPROVED
    with db(srv) as c:
        c.execute("UPDATE audit_events SET mac = 'v1:' || mac WHERE mac NOT LIKE 'v%'")
    r = verify(srv)
    assert not r.intact and r.detail.startswith("event 1 "), r.detail
    backup(srv, "admin")
    with pytest.raises(grpc.RpcError) as e:
        destroy(srv, "audit-mac", 1)
    assert error_reason(e.value) == "KEY_VERSION_IN_USE" and "never destroyed" in \
        e.value.details()


@pytest.mark.parametrize("hide", ["version", "delete"])
def test_an_escrow_hidden_from_the_database_keeps_the_old_escrow_seal_version(server, hide):
    """The token's anchors, not the database's rows, say which records exist: a record
    hidden from the count and the re-seal (another version named, or its row deleted)
    keeps escrow-seal version 1 from being destroyed."""
    srv, factory = server
    eid, chf = escrow(srv, factory)
    with db(srv) as c:
        row = list(c.execute("SELECT * FROM escrows WHERE id = ?", (eid,)).fetchone())
        chfs = c.execute("SELECT * FROM escrow_chfs WHERE escrow_id = ?", (eid,)).fetchall()
    assert rotate(srv, "admin", "escrow-seal").state == pb.Operation.APPROVED
    backup(srv, "admin")
    row_now: list = []

    def hide_it():
        with db(srv) as c:
            row_now.extend(c.execute("SELECT seal, seal_version FROM escrows WHERE id = ?",
                                     (eid,)).fetchone())
            row[:] = c.execute("SELECT * FROM escrows WHERE id = ?", (eid,)).fetchone()
            if hide == "version":
                c.execute("UPDATE escrows SET seal_version = 99 WHERE id = ?", (eid,))
            else:
                c.execute("DELETE FROM escrow_chfs WHERE escrow_id = ?", (eid,))
                c.execute("DELETE FROM escrows WHERE id = ?", (eid,))
    hide_it()
    assert admin_versions(srv, "escrow-seal").get(1, (0, 0))[1] == 0  # the count says unused
    with pytest.raises(grpc.RpcError) as e:
        destroy(srv, "escrow-seal", 1)
    assert error_reason(e.value) == "KEY_VERSION_IN_USE" and eid in e.value.details()
    with db(srv) as c:  # put back: it still releases (once sealed again)
        if hide == "version":
            c.execute("UPDATE escrows SET seal = ?, seal_version = ? WHERE id = ?",
                      (*row_now, eid))
        else:
            c.execute(f"INSERT INTO escrows VALUES ({','.join('?' * len(row))})", row)
            c.executemany("INSERT INTO escrow_chfs VALUES (?, ?)", chfs)
    assert release(srv, chf).certificates


@pytest.mark.parametrize("forged", ["'v999999:' || substr(mac, 1, 64)",
                                    "CAST(x'ff41' AS TEXT)"])
def test_a_forged_mac_on_the_last_event_stops_no_call(server, forged):
    """The writer chains on under the primary (after reading the token again) and
    VerifyAuditLog names the forged event; the break glass is not needed."""
    srv, _ = server
    admin = srv.as_("security-officer-1").admin
    admin.ListKeyVersions(pb.ListKeyVersionsRequest(partition="admin"))
    with db(srv) as c:
        seq = c.execute("SELECT seq FROM audit_head").fetchone()[0]
        c.execute(f"UPDATE audit_events SET mac = {forged} WHERE seq = ?", (seq,))
    assert reason(lambda: admin.ListKeyVersions(pb.ListKeyVersionsRequest(
        partition="admin"))) == "OK"
    r = verify(srv)
    assert not r.intact and r.detail.startswith(f"event {seq} "), r.detail


def test_an_audit_mac_that_is_not_text_is_named_by_verify(server):
    srv, _ = server
    verify(srv)
    with db(srv) as c:
        c.execute("UPDATE audit_events SET mac = CAST(x'ff41' AS TEXT) WHERE seq = 1")
    r = verify(srv)
    assert not r.intact and r.detail.startswith("event 1 "), r.detail


@pytest.mark.parametrize("mac", ["x'00'", "42", "1.5", "'v0:' || substr(mac,1,64)",
                                 "'v1000000:' || substr(mac,1,64)", "upper(mac)"])
def test_a_malformed_audit_mac_is_named_and_the_writer_goes_on(server, mac):
    srv, _ = server
    assert rotate(srv, "admin", "audit-mac").state == pb.Operation.APPROVED
    verify(srv)
    with db(srv) as c:
        c.execute(f"UPDATE audit_events SET mac = {mac} WHERE seq = 3")
    r = verify(srv)
    assert not r.intact and r.detail.startswith("event 3 "), r.detail
    assert reason(lambda: admin_versions(srv, "audit-mac")) == "OK"


@pytest.mark.parametrize("event", [
    "'[' || replace(hex(zeroblob(50000)), '00', '[')",  # nested past any parser's limit
    "CAST(x'ff41' AS TEXT)", "x'7b7d'", "'[1]'", "'{\"mac\": [1]}'"])
def test_a_malformed_audit_intent_leaves_the_key_versions_readable(server, event):
    srv, _ = server
    with db(srv) as c:
        c.execute(f"INSERT INTO audit_intents (id, event, created_at) VALUES "
                  f"(?, {event}, datetime('now', '+1 day'))", (str(uuid.uuid4()),))
    assert reason(lambda: admin_versions(srv, "audit-mac")) == "OK"
    assert reason(lambda: srv.as_("security-officer-1").admin.DestroyKeyVersion(
        pb.DestroyKeyVersionRequest(partition="admin", key="audit-mac", version=1))) \
        == "KEY_VERSION_IN_USE"


def test_malformed_seal_versions_are_refused_and_rolled_forward(server):
    srv, factory = server
    values = ["1.5", "-1", "0", "9223372036854775807", "x'02'", "'abc'", "1e400"]
    made = {v: escrow(srv, factory) for v in values}
    good = escrow(srv, factory)
    with db(srv) as c:
        for v, (eid, _) in made.items():
            c.execute(f"UPDATE escrows SET seal_version = {v} WHERE id = ?", (eid,))
    assert {reason(lambda chf=chf: release(srv, chf)) for _, chf in made.values()} \
        == {"ESCROW_SEAL_INVALID"}
    assert reason(lambda: srv.as_("security-officer-1").admin.ListEscrows(
        pb.ListEscrowsRequest())) == "OK"
    assert rotate(srv, "admin", "escrow-seal").state == pb.Operation.APPROVED
    assert wait(lambda: seal_version(srv, good[0]) == 2)
    assert release(srv, good[1]).certificates
    assert srv.stop() == 0
    again = start_server(srv.state_dir)  # start-up rolls them forward to their anchors
    try:
        assert all(release(again, chf).certificates for _, chf in made.values())
    finally:
        again.stop()


def test_an_escrow_row_that_cannot_be_read_is_flagged_and_the_others_are_sealed_again(
        server):
    """A note that is not UTF-8 (SQLite keeps it; its driver will not hand it over): that
    record is altered, the others are sealed again, and the server starts again."""
    srv, factory = server
    bad, bad_chf = escrow(srv, factory)
    goods = [escrow(srv, factory) for _ in range(3)]
    with db(srv) as c:
        c.execute("UPDATE escrows SET note = CAST(x'ff41' AS TEXT) WHERE id = ?", (bad,))
    assert reason(lambda: release(srv, bad_chf)) == "ESCROW_SEAL_INVALID"
    assert rotate(srv, "admin", "escrow-seal").state == pb.Operation.APPROVED
    assert wait(lambda: all(seal_version(srv, eid) == 2 for eid, _ in goods))

    def flagged() -> bool:  # the job's flag event may come just after the others' rows
        events = srv.as_("auditor").audit.ListAuditEvents(pb.ListAuditEventsRequest(
            page_size=1000)).events
        return any(bad in e.target and "not sealed again" in e.target for e in events)
    assert wait(flagged)
    assert srv.stop() == 0
    again = start_server(srv.state_dir)
    try:
        assert release(again, goods[0][1]).certificates
    finally:
        again.stop()


def test_junk_escrow_rows_neither_flood_the_log_nor_starve_the_real_records(server):
    """More junk rows than a pass looks at, all sorting before the real record: flagged in
    one event a pass, and the real record is sealed again all the same."""
    srv, factory = server
    real, chf = escrow(srv, factory)
    with db(srv) as c:
        row = list(c.execute("SELECT * FROM escrows WHERE id = ?", (real,)).fetchone())
        cols = [r[1] for r in c.execute("PRAGMA table_info(escrows)")]
        junk = []
        for n in range(1100):
            r = list(row)
            r[cols.index("id")], r[cols.index("seal_version")] = f"!junk-{n:06d}", 0
            junk.append(r)
        c.executemany(f"INSERT INTO escrows VALUES ({','.join('?' * len(cols))})", junk)
    assert rotate(srv, "admin", "escrow-seal").state == pb.Operation.APPROVED
    assert wait(lambda: seal_version(srv, real) == 2, timeout=90)
    time.sleep(1)
    events = srv.as_("auditor").audit.ListAuditEvents(pb.ListAuditEventsRequest(
        page_size=1000)).events
    about_junk = [e for e in events if "junk-" in e.target]
    assert 1 <= len(about_junk) <= 3, [e.target for e in about_junk]
    assert "and 999 more" in about_junk[0].target
    assert release(srv, chf).certificates


def test_an_escrow_id_that_cannot_be_read_is_flagged_once_and_stops_nothing_else(server):
    srv, factory = server
    real, chf = escrow(srv, factory)
    with db(srv) as c:
        row = list(c.execute("SELECT * FROM escrows WHERE id = ?", (real,)).fetchone())
        cols = [r[1] for r in c.execute("PRAGMA table_info(escrows)")]
        marks = ",".join("CAST(x'ff41' AS TEXT)" if c_ == "id" else "?" for c_ in cols)
        c.execute(f"INSERT INTO escrows VALUES ({marks})",
                  [v for c_, v in zip(cols, row) if c_ != "id"])
    assert rotate(srv, "admin", "escrow-seal").state == pb.Operation.APPROVED
    assert wait(lambda: any("holds an escrow id that cannot be read" in e.target for e in
                            srv.as_("auditor").audit.ListAuditEvents(
                                pb.ListAuditEventsRequest(page_size=1000)).events))
    assert reason(lambda: srv.as_("security-officer-1").admin.DestroyKeyVersion(
        pb.DestroyKeyVersionRequest(partition="admin", key="escrow-seal", version=1))) \
        == "KEY_VERSION_IN_USE"
    assert reason(lambda: release(srv, chf)) == "OK"


def test_the_break_glass_is_not_needed_after_a_forged_head(tmp_path):
    srv, _ = serve(tmp_path)
    with db(srv) as c:
        c.execute("UPDATE audit_events SET mac = 'v999999:' || substr(mac, 1, 64) "
                  "WHERE seq = (SELECT seq FROM audit_head)")
    assert srv.stop() == 0
    again = start_server(srv.state_dir)
    try:
        assert reason(lambda: admin_versions(again, "audit-mac")) == "OK"
    finally:
        again.stop()
    assert keysvc("audit-new-chain", "--reason", "test", state=srv.state_dir,
                  check=False).returncode in (0, 1)  # runs; says what it did or why not
