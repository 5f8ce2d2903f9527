"""The rewrap against a database writer's rows (issue 15; from the review of the rewrap
process and its cursor), on a real server with SQLite:

- a row whose text is not UTF-8 is an altered record: flagged, passed by, and every other
  row is moved;
- rows flagged in one run do not stop a later rotation's rewrap (junk rows made, flagged,
  then deleted).
"""
from __future__ import annotations

import datetime as dt
import sqlite3
import time

import pytest

from tests.test_rotation import _load, _serve, rotate, versions, wait_rewrapped


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    srv, factory, keks = _serve(tmp_path_factory.mktemp("r3cursor"), "3000")
    _load(srv, factory, keks, 10, "MGEF-R3-1")
    yield srv
    srv.stop()


def _db(srv):
    return sqlite3.connect(srv.state_dir / "keysvc.db")


def _junk(db, device_id, version, chf="CHF"):
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    db.execute("INSERT INTO device_keys (device_id, role, name, chf_identifier, wrapped, kcv,"
               " file_id, created_at, key_version, seal) VALUES (?,?,?,?,?,?,?,?,?,?)",
               (device_id, "PREPAYMENT", "x", chf, b"\0" * 40, "000000", "F", now, version,
                b"\0" * 32))


def _events(db, like):
    return db.execute("SELECT count(*) FROM audit_events WHERE target LIKE ?",
                      (f"%{like}%",)).fetchone()[0]


def test_a_row_that_cannot_be_read_is_flagged_and_every_other_row_moved(srv):
    with _db(srv) as db:  # first in key order, on version 1, a chf that is not UTF-8
        _junk(db, "00000000", 1)
        db.execute("UPDATE device_keys SET chf_identifier = CAST(X'FFFE' AS TEXT) "
                   "WHERE device_id = '00000000'")
    rotate(srv, "s1sp")
    deadline = time.monotonic() + 60
    while versions(srv, "s1sp").get(1, 0) > 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert versions(srv, "s1sp").get(1, 0) == 1  # only the row that cannot be read
    with _db(srv) as db:
        assert _events(db, "device_keys/00000000") >= 1  # flagged (audited)


def test_rows_flagged_in_one_run_do_not_stop_a_later_rotations_rewrap(srv):
    with _db(srv) as db:  # clean up A so the job can finish
        db.execute("DELETE FROM device_keys WHERE device_id = '00000000'")
    done = wait_rewrapped(srv, "s1sp", timeout=60)
    real = sum(done.values())
    print("after A", done)
    primary = max(done)
    with _db(srv) as db:  # K > real junk rows on an older (still present) version
        for i in range(real + 20):
            _junk(db, f"ZZ{i:06d}", primary - 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with _db(srv) as db:
            if _events(db, "ZZ") >= real + 20:  # each flagged (its seal fails)
                break
        time.sleep(1)
    with _db(srv) as db:
        db.execute("DELETE FROM device_keys WHERE device_id LIKE 'ZZ%'")
    rotate(srv, "s1sp")  # an ordinary dual-control rotation later
    after = wait_rewrapped(srv, "s1sp", timeout=60)
    assert sum(after.values()) == real
