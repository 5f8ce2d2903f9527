"""Storage-key versions (issue 15): RotateKey under dual control, the online rewrap inside
the HSM, and DestroyKeyVersion only once no stored key uses the version.

Each test module runs its own server: rotation changes the partition's primary version.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import time

import grpc
import pytest

from keysvc.api.v1 import keysvc_pb2 as pb
from keysvc.client import error_reason
from tests.conftest import fresh_postgres_database, postgres_url
from tests.serverproc import start_server
from tests.support import encoder
from tests.support.encoder import kcv
from tests.test_custody import keysvc, token_objects

N = 400  # installations: about 1,300 stored device keys and 400 master keys


def _file(installs, factory_keks, file_id):
    kek_s, kek_d = factory_keks
    return encoder.build_file(installs, file_id=file_id, originator_id="SMSO-R",
                              s1sp_key_name="R-S1SP", s1sp_kek=kek_s, dco_key_name="R-DCO",
                              dco_kek=kek_d)


def _serve(work, rate: str, env: dict | None = None):
    factory = encoder.DeviceCertificateFactory()
    (work / "ca.pem").write_bytes(factory.ca_pem)
    srv = start_server(work / "server", trust_anchors=[work / "ca.pem"],
                       env={"KEYSVC_REWRAP_ROWS_PER_SECOND": rate, **(env or {})})
    keks = os.urandom(32), os.urandom(32)
    srv.import_aes_key("R-S1SP", keks[0], purpose="S1SP_TRANSPORT", owner_id="SMSO-R")
    srv.import_aes_key("R-DCO", keks[1], purpose="DCO_TRANSPORT", owner_id="SMSO-R")
    return srv, factory, keks


def _load(srv, factory, keks, n: int, file_id: str):
    installs = encoder.random_installations(n, cert_factory=factory)
    data = _file(installs, keks, file_id)
    srv.as_("s1sp").s1sp.ProcessGroupInformation(pb.ProcessGroupInformationRequest(file=data),
                                                 timeout=120)
    srv.as_("dco").dco.UnwrapMasterKeys(pb.UnwrapMasterKeysRequest(file=data), timeout=120)
    return installs


def _dual(srv, request_call, request):
    """Officer 1 requests, officer 2 approves exactly what was shown."""
    op = request_call(srv.as_("security-officer-1").admin)(request)
    return srv.as_("security-officer-2").admin.ApproveOperation(pb.ApproveOperationRequest(
        operation_id=op.operation_id, request_digest=op.request_digest))


def rotate(srv, partition: str, key: str = "storage-key"):
    return _dual(srv, lambda a: a.RotateKey, pb.RotateKeyRequest(partition=partition, key=key))


def destroy_version(srv, partition: str, version: int):
    return _dual(srv, lambda a: a.DestroyKeyVersion, pb.DestroyKeyVersionRequest(
        partition=partition, key="storage-key", version=version))


def versions(srv, partition: str) -> dict[int, int]:
    r = srv.as_("security-officer-1").admin.ListKeyVersions(
        pb.ListKeyVersionsRequest(partition=partition))
    return {v.version: v.stored_keys for v in r.versions if v.key == "storage-key"}


def wait_rewrapped(srv, partition: str, timeout: float = 120) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        vs = versions(srv, partition)
        newest = max(vs)
        if all(n == 0 for v, n in vs.items() if v < newest):
            return vs
        time.sleep(0.5)
    raise AssertionError(f"rewrap of {partition} not done: {versions(srv, partition)}")


def _row(srv, device_id: str) -> tuple:
    with sqlite3.connect(srv.state_dir / "keysvc.db") as db:
        return db.execute("SELECT wrapped, key_version, seal FROM device_keys WHERE "
                          "device_id = ? AND role = 'PREPAYMENT'", (device_id,)).fetchone()


def _put_row(srv, device_id: str, row: tuple) -> None:
    with sqlite3.connect(srv.state_dir / "keysvc.db") as db:
        db.execute("UPDATE device_keys SET wrapped = ?, key_version = ?, seal = ? WHERE "
                   "device_id = ? AND role = 'PREPAYMENT'", (*row, device_id))


def all_verify(srv, installs) -> bool:
    for inst in installs:
        if not srv.as_("s1sp").s1sp.VerifyPrepaymentKey(pb.VerifyPrepaymentKeyRequest(
                device_id=inst.esme, expected_kcv=kcv(inst.prepay_key))).match:
            return False
        if not srv.as_("dco").dco.VerifyMasterKey(pb.VerifyMasterKeyRequest(
                device_id=inst.esme, expected_kcv=kcv(inst.master_key))).match:
            return False
    return True


@pytest.fixture(scope="module")
def rotated(tmp_path_factory):
    srv, factory, keks = _serve(tmp_path_factory.mktemp("rotation"), "3000")
    installs = _load(srv, factory, keks, N, "MGEF-R-1")
    srv.old_row = _row(srv, installs[0].esme)  # a sealed version-1 row, for a rollback
    before = {p: versions(srv, p) for p in ("s1sp", "dco")}
    ops = {p: rotate(srv, p) for p in ("s1sp", "dco")}
    after = {p: wait_rewrapped(srv, p) for p in ("s1sp", "dco")}
    yield srv, factory, keks, installs, before, ops, after
    srv.stop()


def test_rotation_is_approved_by_a_second_officer_and_makes_version_2_primary(rotated):
    srv, _, _, _, before, ops, _ = rotated
    assert set(before["s1sp"]) == {1} and before["s1sp"][1] > 3 * N
    for op in ops.values():
        assert op.state == pb.Operation.APPROVED and op.kind == "ROTATE_KEY"
        assert "version 2" in op.message
    r = srv.as_("security-officer-1").admin.ListKeyVersions(
        pb.ListKeyVersionsRequest(partition="s1sp"))
    primary = [v.version for v in r.versions if v.key == "storage-key" and v.primary]
    assert primary == [2]


def test_rotation_alone_is_only_a_request(rotated):
    srv = rotated[0]
    op = srv.as_("security-officer-1").admin.RotateKey(pb.RotateKeyRequest(
        partition="dco", key="storage-key"))
    assert op.state == pb.Operation.PENDING
    assert any("no backup" in w for w in op.request.warnings)
    assert max(versions(srv, "dco")) == 2


def test_rewrap_moves_every_row_to_the_primary_and_every_kcv_is_unchanged(rotated):
    srv, _, _, installs, before, _, after = rotated
    for p in ("s1sp", "dco"):
        assert after[p].get(1, 0) == 0 and after[p][2] == sum(before[p].values())
    assert all_verify(srv, installs)


def test_rewrap_end_is_audited_with_the_count_per_version(rotated):
    srv = rotated[0]
    events = srv.as_("auditor").audit.ListAuditEvents(pb.ListAuditEventsRequest(
        action="custody.rewrap", page_size=10)).events
    targets = " | ".join(e.target for e in events)
    assert "s1sp:" in targets and "dco:" in targets and "v2:" in targets


def test_cli_shows_versions_and_the_rewrap_with_its_eta(rotated):
    """`keysvc admin key-versions` and `keysvc admin rewrap status` (the README's commands)."""
    srv = rotated[0]
    out = keysvc("admin", "key-versions", "--server", srv.target, "--json", state=srv.state_dir)
    rows = _json_rows(out.stdout, "key versions")
    assert {(r["partition"], r["key"], r["version"]) for r in rows
            if r.get("key") == "storage-key"} >= {("s1sp", "storage-key", 2),
                                                   ("dco", "storage-key", 2)}
    out = keysvc("admin", "rewrap", "status", "--server", srv.target, "--json",
                 state=srv.state_dir)
    rows = _json_rows(out.stdout, "rewrap")
    assert {r["partition"]: r["remaining"] for r in rows} == {"s1sp": 0, "dco": 0}
    assert all(r["eta"] == "-" for r in rows)  # nothing left: no ETA


def _json_rows(stdout: str, table: str) -> list[dict]:
    return [row for line in stdout.splitlines() if line.startswith("{")
            for t in [json.loads(line)] if t["table"] == table for row in t["rows"]]


def test_new_files_are_wrapped_under_the_primary(rotated):
    srv, factory, keks, _, _, _, _ = rotated
    before = versions(srv, "s1sp")
    installs = _load(srv, factory, keks, 3, "MGEF-R-2")
    assert versions(srv, "s1sp")[2] > before[2] and versions(srv, "s1sp").get(1, 0) == 0
    assert all_verify(srv, installs)


def test_a_pending_component_opens_after_the_component_seal_rotates(rotated):
    """Officer 1's component, sealed under component-seal version 1, waits for officer 2;
    the key rotates meanwhile; version 1 cannot be destroyed while the component waits,
    and the approval still opens it."""
    srv = rotated[0]
    key, c1 = os.urandom(32), os.urandom(32)
    c2 = bytes(a ^ b for a, b in zip(key, c1))
    o1, o2 = (srv.as_(f"security-officer-{n}").admin for n in (1, 2))
    op = o1.ImportTransportKey(pb.ImportTransportKeyRequest(
        name="R-FROM-COMPONENTS", purpose=pb.S1SP_TRANSPORT, owner_id="SMSO-R",
        owner_type=pb.SMSO, expected_kcv=kcv(key), component=c1))
    assert rotate(srv, "s1sp", "component-seal").state == pb.Operation.APPROVED
    r = o1.ListKeyVersions(pb.ListKeyVersionsRequest(partition="s1sp"))
    assert {(v.version, v.primary, v.stored_keys) for v in r.versions
            if v.key == "component-seal"} == {(1, False, 1), (2, True, 0)}
    with pytest.raises(grpc.RpcError) as e:
        o1.DestroyKeyVersion(pb.DestroyKeyVersionRequest(partition="s1sp",
                                                         key="component-seal", version=1))
    assert error_reason(e.value) == "KEY_VERSION_IN_USE" and "pending" in e.value.details()
    done = o2.ApproveOperation(pb.ApproveOperationRequest(
        operation_id=op.operation_id, component=c2, request_digest=op.request_digest))
    assert done.state == pb.Operation.APPROVED, done.message
    assert o1.GetKey(pb.GetKeyRequest(name="R-FROM-COMPONENTS")).kcv == kcv(key)


def test_the_record_seal_keys_do_not_rotate(rotated):
    srv = rotated[0]
    with pytest.raises(grpc.RpcError) as e:
        srv.as_("security-officer-1").admin.RotateKey(pb.RotateKeyRequest(
            partition="s1sp", key="record-seal"))
    assert error_reason(e.value) == "INVALID_REQUEST"


def test_the_primary_version_cannot_be_destroyed(rotated):
    srv = rotated[0]
    with pytest.raises(grpc.RpcError) as e:
        srv.as_("security-officer-1").admin.DestroyKeyVersion(pb.DestroyKeyVersionRequest(
            partition="s1sp", key="storage-key", version=2))
    assert error_reason(e.value) == "KEY_VERSION_IN_USE"


def backup(srv, partition: str) -> None:
    pki = srv.state_dir / "pki"
    keysvc("admin", "backup", "--partition", partition, "--threshold", "2", "--out",
           str(srv.state_dir / "backups"), "--custodian", str(pki / "security-officer-1.pem"),
           "--custodian", str(pki / "security-officer-2.pem"), state=srv.state_dir)


def test_a_version_no_backup_holds_cannot_be_destroyed(rotated):
    """The row count is the database's word: a version is destroyed only once a backup
    holds it, so rows hidden from the count stay recoverable."""
    srv = rotated[0]
    with pytest.raises(grpc.RpcError) as e:
        srv.as_("security-officer-1").admin.DestroyKeyVersion(pb.DestroyKeyVersionRequest(
            partition="s1sp", key="storage-key", version=1))
    assert error_reason(e.value) == "VERSION_NOT_BACKED_UP"


def test_an_unused_old_version_is_destroyed_under_dual_control_and_keys_still_verify(rotated):
    srv, _, _, installs, _, _, _ = rotated
    backup(srv, "s1sp")
    op = destroy_version(srv, "s1sp", 1)
    assert op.state == pb.Operation.APPROVED, op.message
    assert "storage-key" not in token_objects(srv.state_dir, "s1sp")
    assert "storage-key@v2" in token_objects(srv.state_dir, "s1sp")
    assert set(versions(srv, "s1sp")) == {2}
    assert all_verify(srv, installs[:20])


def test_a_row_put_back_on_a_destroyed_version_is_refused_as_such(rotated):
    """A database writer restores the sealed version-1 copy of a row after version 1 was
    destroyed: the key cannot be read, and the call says why (not INTERNAL)."""
    srv, _, _, installs, _, _, _ = rotated
    inst = installs[0]
    current = _row(srv, inst.esme)
    _put_row(srv, inst.esme, srv.old_row)
    try:
        with pytest.raises(grpc.RpcError) as e:
            srv.as_("s1sp").s1sp.VerifyPrepaymentKey(pb.VerifyPrepaymentKeyRequest(
                device_id=inst.esme, expected_kcv=kcv(inst.prepay_key)))
        assert error_reason(e.value) == "KEY_VERSION_DESTROYED"
        # The next rotation's rewrap flags that row and moves every other one.
        rotate(srv, "s1sp")
        deadline = time.monotonic() + 60
        while versions(srv, "s1sp").get(2, 0) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert versions(srv, "s1sp")[2] == 0
        r = srv.as_("security-officer-1").admin.ListKeyVersions(
            pb.ListKeyVersionsRequest(partition="s1sp"))
        assert [(w.remaining, w.flagged) for w in r.rewrap] == [(1, 1)]
    finally:
        _put_row(srv, inst.esme, current)
    events = srv.as_("auditor").audit.ListAuditEvents(pb.ListAuditEventsRequest(
        action="keysvc.v1.S1SPService/VerifyPrepaymentKey", page_size=1000)).events
    assert any(e.code == "KEY_VERSION_DESTROYED" for e in events)
    flagged = srv.as_("auditor").audit.ListAuditEvents(pb.ListAuditEventsRequest(
        page_size=1000)).events
    assert any("is destroyed; not rewrapped" in e.target for e in flagged)


def test_a_new_version_shows_as_not_backed_up(rotated):
    srv = rotated[0]
    r = srv.as_("security-officer-1").admin.ListKeyVersions(
        pb.ListKeyVersionsRequest(partition="dco"))
    assert [v.backed_up for v in r.versions if v.key == "storage-key"] == [False, False]


def test_restart_after_version_1_is_gone(rotated):
    srv, _, _, installs, _, _, _ = rotated
    assert srv.stop() == 0
    again = start_server(srv.state_dir)
    try:
        assert all_verify(again, installs[:5])
    finally:
        again.stop()


# =========================================================================== without the job
@pytest.fixture(scope="module")
def paused(tmp_path_factory):
    """A server whose rewrap job is off: rows stay on version 1 after a rotation."""
    srv, factory, keks = _serve(tmp_path_factory.mktemp("paused"), "0")
    installs = _load(srv, factory, keks, 20, "MGEF-P-1")
    rotate(srv, "dco")
    yield srv, installs
    srv.stop()


def test_a_version_that_stored_keys_use_cannot_be_destroyed(paused):
    srv, _ = paused
    with pytest.raises(grpc.RpcError) as e:
        srv.as_("security-officer-1").admin.DestroyKeyVersion(pb.DestroyKeyVersionRequest(
            partition="dco", key="storage-key", version=1))
    assert error_reason(e.value) == "KEY_VERSION_IN_USE"
    assert "20 stored keys" in e.value.details()


def test_rows_on_an_old_version_still_verify_while_waiting_for_the_rewrap(paused):
    srv, installs = paused
    assert versions(srv, "dco") == {1: 20, 2: 0}
    assert all_verify(srv, installs)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_rewrap_killed_half_way_resumes_and_loses_and_doubles_nothing(tmp_path_factory,
                                                                      database):
    """kill -9 while the job runs (throttled to 300 rows/s), then a restart finishes it."""
    env = {}
    if database == "postgresql":
        if not postgres_url():
            pytest.skip("no test PostgreSQL (run `make test`)")
        env["KEYSVC_DATABASE_URL"] = fresh_postgres_database("keysvc_rewrap")
        env["KEYSVC_DEV"] = "on"
    work = tmp_path_factory.mktemp(f"killed-{database}")
    srv, factory, keks = _serve(work, "300", env)
    installs = _load(srv, factory, keks, 300, "MGEF-K-1")
    total = sum(versions(srv, "s1sp").values())
    rotate(srv, "s1sp")
    deadline = time.monotonic() + 60
    while versions(srv, "s1sp").get(2, 0) < 300 and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait()
    again = start_server(srv.state_dir, env={"KEYSVC_REWRAP_ROWS_PER_SECOND": "3000", **env})
    try:
        mid = versions(again, "s1sp")
        assert 0 < mid[1] < total and mid[1] + mid[2] == total
        done = wait_rewrapped(again, "s1sp")
        assert done == {1: 0, 2: total}
        assert all_verify(again, installs)
    finally:
        again.stop()


def test_a_key_version_that_is_not_an_integer_is_malformed():
    """SQLite keeps any type: 1.5 would convert to 1 and pass version 1's seal, yet never
    match a version-1 row in the rewrap's compare-and-set."""
    from keysvc.records.stored_keys import _version
    assert _version(2) == 2
    for bad in (1.5, "1", True, None):
        with pytest.raises(TypeError):
            _version(bad)


def test_rows_are_stored_only_under_the_primary_storage_key_version(app):
    """A file whose keys were wrapped before a rotation is refused at its commit
    (KEY_ROTATED) and stores nothing: no row may name a version that could be destroyed
    meanwhile."""
    import datetime as dt

    from keysvc.errors import KeysvcError
    from keysvc.records.stored_keys import StoredKey
    k = StoredKey("10-00-00-00-00-00-99-01", "PREPAYMENT", "PrepaymentKey",
                  "00-00-00-00-00-00-99-01", "MGEF-ROTATED", 99, "ABCDEF0123", bytes(40))
    with pytest.raises(KeysvcError) as e:
        with app.store.tx() as conn:
            app.records.device_keys.insert_many(conn, [(k, bytes(32))],
                                                dt.datetime.now(dt.timezone.utc))
    assert e.value.code == "KEY_ROTATED"
    assert app.records.device_keys.count_by_version().get(99, 0) == 0


@pytest.mark.parametrize("table", ["device_keys", "master_keys"])
def test_a_flagged_row_has_one_name_so_the_rewrap_skips_it_after(app, table):
    """The rewrap flags a bad row once and skips it afterwards by name; a row and the
    stored key read from it must be named alike (a master key's name is its device)."""
    import datetime as dt

    from sqlalchemy import select

    from keysvc.records.stored_keys import StoredKey
    stored = getattr(app.records, table)
    k = StoredKey("10-00-00-00-00-00-98-01", "PREPAYMENT" if table == "device_keys"
                  else stored.ROLE, "PrepaymentKey" if table == "device_keys" else stored.NAME,
                  "00-00-00-00-00-00-98-01", "MGEF-NAMES", 1, "ABCDEF0123", bytes(40))
    with app.store.tx() as conn:
        stored.insert_many(conn, [(k, bytes(32))], dt.datetime.now(dt.timezone.utc))
    with app.store.engine.connect() as conn:
        row = conn.execute(select(stored.table).where(
            stored.table.c.device_id == k.device_id)).one()
    assert stored.record_name(row) == stored.record_name(k)
