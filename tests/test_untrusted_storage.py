"""The database is untrusted storage (README, threat model), on SQLite and on PostgreSQL.

Each test is one attack by someone who can read and write every table but has neither the
HSM nor its PINs. Each must end in RECORD_SEAL_INVALID (or ESCROW_SEAL_INVALID for escrow
records), with nothing used or stored, and a `record.seal_invalid` audit event; never in a
wrong key, a silent success, or INTERNAL.
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import os
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding
from sqlalchemy import func, select, text

from keysvc import dco, escrow, keyadmin, s1sp
from keysvc import store as st
from keysvc.device_certificate import TrustStore
from keysvc.errors import KeysvcError
from keysvc.hsm import keys as hk
from tests.conftest import OFFICER_1, OFFICER_2, OFFICER_3, S1SP, unique
from tests.keyloading import load_aes_key, wrap_for_job
from tests.support import encoder as enc
from tests.test_dco import Made
from tests.test_s1sp_validation import FACTORY, KW_KEY, KW_NAME, Kit, ensure_key


# --------------------------------------------------------------------------- helpers
def sql(app, statement: str, **params) -> int:
    """Change the database behind keysvc's back; returns the rows changed."""
    with app.store.engine.begin() as conn:
        return conn.execute(text(statement), params).rowcount


def refused(fn, *args, code: str = "RECORD_SEAL_INVALID", **kwargs) -> KeysvcError:
    with pytest.raises(KeysvcError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value.message
    return info.value


def tamper_events(app) -> list:
    events, _ = app.audit.list(action="record.seal_invalid", page_size=1000)
    assert all(e.code == "RECORD_SEAL_INVALID" and e.outcome == "ERROR" for e in events)
    return events


def assert_audited(app, record_prefix: str) -> None:
    assert any(e.target.startswith(record_prefix) for e in tamper_events(app)), \
        [e.target for e in tamper_events(app)]


def count(app, table) -> int:
    with app.store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


@pytest.fixture()
def s1sp_world(any_app):
    """Two EA installations processed: devices A and B have stored keys."""
    any_app.trust = TrustStore(anchors=(FACTORY.ca_cert,))
    ensure_key(any_app, KW_NAME, aes=KW_KEY, purpose="S1SP_TRANSPORT")
    kit = Kit(any_app)
    insts = kit.installations(2)
    result = kit.process(kit.file(insts))
    assert [i.status for i in result.installations] == ["ACCEPTED", "ACCEPTED"]
    return any_app, insts


def prepay(inst) -> str:
    return enc.kcv(inst.prepay_key)


# --------------------------------------------------------------------------- device keys
def test_prepayment_rows_swapped_between_devices_are_record_seal_invalid(s1sp_world):
    app, (a, b) = s1sp_world
    assert s1sp.verify_prepayment_key(app, a.esme, prepay(a))
    sql(app, "UPDATE device_keys SET device_id='SWAP' WHERE device_id=:a AND role='PREPAYMENT'",
        a=a.esme)
    sql(app, "UPDATE device_keys SET device_id=:a WHERE device_id=:b AND role='PREPAYMENT'",
        a=a.esme, b=b.esme)
    refused(s1sp.verify_prepayment_key, app, a.esme, prepay(b))
    refused(s1sp.verify_prepayment_key, app, a.esme, prepay(a))
    assert_audited(app, "device_keys/" + a.esme)


def test_device_rows_copied_to_another_device_are_record_seal_invalid(s1sp_world):
    app, (a, _b) = s1sp_world
    other = enc.random_installations(1)[0].esme
    cols = "role, name, chf_identifier, wrapped, kcv, file_id, created_at, key_version, seal"
    sql(app, f"INSERT INTO device_keys (device_id, {cols}) SELECT :c, {cols} FROM device_keys "
             "WHERE device_id=:a", a=a.esme, c=other)
    refused(s1sp.verify_prepayment_key, app, other, prepay(a))
    assert_audited(app, "device_keys/" + other)


def test_a_row_relabelled_from_authentication_to_prepayment_is_record_seal_invalid(s1sp_world):
    app, (a, _b) = s1sp_world
    sql(app, "DELETE FROM device_keys WHERE device_id=:a AND role='PREPAYMENT'", a=a.esme)
    sql(app, "UPDATE device_keys SET role='PREPAYMENT', name='PrepaymentKey' "
             "WHERE device_id=:a AND role='AUTHENTICATION'", a=a.esme)
    refused(s1sp.verify_prepayment_key, app, a.esme, enc.kcv(a.auth_key))
    assert_audited(app, "device_keys/" + a.esme)


def test_a_kcv_column_set_by_hand_is_record_seal_invalid_and_never_reported(s1sp_world):
    app, (a, _b) = s1sp_world
    name = unique("S1SP-EXPORT")
    export_key = os.urandom(32)
    load_aes_key(app, name, export_key, purpose="EXPORT", owner_id="S1SP", owner_type="S1SP")
    exported = s1sp.export_device_keys(app, a.esme, ["PREPAYMENT"], name)
    # The KCV reported is the HSM's, of the key actually exported.
    (k,) = exported
    assert k.kcv == prepay(a) == enc.kcv(aes_key_unwrap_with_padding(export_key, k.wrapped))
    sql(app, "UPDATE device_keys SET kcv='DEADBEEF00' WHERE device_id=:a", a=a.esme)
    refused(s1sp.export_device_keys, app, a.esme, ["PREPAYMENT"], name)
    assert_audited(app, "device_keys/" + a.esme)


def test_master_keys_swapped_between_devices_are_record_seal_invalid(any_app):
    app = any_app
    m = Made(app, n=2)
    dco.process_master_keys(app, S1SP, m.xml, store=True)
    a, b = m.insts
    assert dco.verify_master_key(app, a.esme, enc.kcv(a.master_key))
    sql(app, "UPDATE master_keys SET device_id='SWAP' WHERE device_id=:a", a=a.esme)
    sql(app, "UPDATE master_keys SET device_id=:a WHERE device_id=:b", a=a.esme, b=b.esme)
    refused(dco.verify_master_key, app, a.esme, enc.kcv(b.master_key))
    assert_audited(app, "master_keys/" + a.esme)


def test_an_edited_stored_file_result_is_record_seal_invalid(s1sp_world):
    app, insts = s1sp_world
    kit = Kit(app)
    data = kit.file(insts[:1], file_id=unique("MGEF"))
    # a new file for device A would be DUPLICATE_IDENTIFIER; its stored result is edited
    kit.process(data)
    sql(app, "UPDATE migration_files SET result=REPLACE(result, 'REJECTED', 'ACCEPTED')")
    refused(kit.process, data)
    assert_audited(app, "migration_files/s1sp/")


# --------------------------------------------------------------------------- key records
def _transport_key(app) -> tuple[str, Kit]:
    app.trust = TrustStore(anchors=(FACTORY.ca_cert,))
    name, kek = unique("S1SP-TK"), os.urandom(32)
    load_aes_key(app, name, kek, purpose="S1SP_TRANSPORT", owner_id="SMSO-LG-01")
    return name, Kit(app, key_name=name, kek=kek)


def _state_change(app, name: str, kind: str) -> None:
    op = keyadmin.change_key_state(app, OFFICER_1, name, kind)
    keyadmin.approve(app, OFFICER_2, op.operation_id)


def _snapshot(app, table: str, key: str, value: str) -> dict:
    with app.store.engine.connect() as conn:
        return dict(conn.execute(text(f"SELECT * FROM {table} WHERE {key}=:v"),
                                 {"v": value}).first()._mapping)


def _restore(app, table: str, key: str, row: dict) -> None:
    sets = ", ".join(f"{c}=:{c}" for c in row if c != key)
    assert sql(app, f"UPDATE {table} SET {sets} WHERE {key}=:{key}", **row) == 1


def test_a_disabled_key_set_back_to_enabled_is_record_seal_invalid(any_app):
    app = any_app
    name, kit = _transport_key(app)
    _state_change(app, name, "DISABLE_KEY")
    sql(app, "UPDATE keys SET state='ENABLED' WHERE name=:n", n=name)
    refused(kit.process, kit.file(kit.installations(1)))
    assert count(app, st.device_keys) == 0
    assert_audited(app, f"keys/{name}")


def test_an_older_sealed_copy_of_a_disabled_key_is_record_seal_invalid(any_app):
    app = any_app
    name, kit = _transport_key(app)
    enabled = _snapshot(app, "keys", "name", name)
    _state_change(app, name, "DISABLE_KEY")
    _restore(app, "keys", "name", enabled)  # its seal was valid, once
    refused(kit.process, kit.file(kit.installations(1)))
    assert count(app, st.device_keys) == 0
    assert_audited(app, f"keys/{name}")


def test_a_destroyed_key_put_back_is_record_seal_invalid_never_internal(any_app):
    app = any_app
    name, kit = _transport_key(app)
    enabled = _snapshot(app, "keys", "name", name)
    _state_change(app, name, "DESTROY_KEY")
    _restore(app, "keys", "name", enabled)
    refused(kit.process, kit.file(kit.installations(1)))
    refused(keyadmin.change_key_state, app, OFFICER_1, name, "ENABLE_KEY")


@pytest.mark.parametrize("column,value", [("owner_id", "ATTACKER"),
                                          ("owner_type", "REQUESTING_PARTY"),
                                          ("purpose", "EXPORT"),
                                          ("allowed_originators", '["ATTACKER"]')])
def test_a_key_re_owned_or_re_purposed_in_the_database_is_record_seal_invalid(any_app, column,
                                                                              value):
    app = any_app
    name, kit = _transport_key(app)
    sql(app, f"UPDATE keys SET {column}=:v WHERE name=:n", v=value, n=name)
    refused(kit.process, kit.file(kit.installations(1)))
    refused(keyadmin.get_key, app, name)
    listed = {k.name: k.seal_intact for k in keyadmin.list_keys(app)}
    assert listed[name] is False
    assert_audited(app, f"keys/{name}")


def test_a_key_whose_token_object_is_another_than_its_record_names_is_refused(any_app):
    """The record names the object by CKA_ID: an object of that label made by another
    operation (a database restored over newer keys) is not the key the record describes."""
    app = any_app
    name, kit = _transport_key(app)
    with app.partitions.s1sp.session() as s:
        hk.set_id(s, name, "op-someone-else")
    refused(kit.process, kit.file(kit.installations(1)))
    assert_audited(app, f"keys/{name}")


# --------------------------------------------------------------------------- operations
def _pending_import(app, purpose: str = "S1SP_TRANSPORT") -> tuple[str, str, bytes]:
    key = os.urandom(32)
    job = keyadmin.create_import_job(app, OFFICER_1, "job", purpose)
    name = unique("S1SP-TK")
    op = keyadmin.import_transport_key(
        app, OFFICER_1, name=name, purpose=purpose, owner_id="SMSO-LG-01", owner_type="SMSO",
        expected_kcv=enc.kcv(key), wrapped_key=wrap_for_job(job.public_key_pem, key),
        import_job_id=job.import_job_id)
    return op.operation_id, name, key


def _token_has(app, name: str) -> bool:
    with app.partitions.s1sp.session() as s:
        return bool(list(s.raw.get_objects({hk.A.LABEL: name})))


def test_a_made_up_approver_is_record_seal_invalid(any_app):
    app = any_app
    app.settings = replace(app.settings, quorum=3)
    op_id, name, _ = _pending_import(app)
    row = _snapshot(app, "operations", "id", op_id)
    approvals = json.loads(row["approvals"])
    approvals.append({**approvals[0], "officer": "security-officer-9"})
    sql(app, "UPDATE operations SET approvals=:a WHERE id=:i", a=json.dumps(approvals), i=op_id)
    refused(keyadmin.approve, app, OFFICER_2, op_id)
    assert not _token_has(app, name)
    assert_audited(app, f"operations/{op_id}")


def test_a_rewritten_pending_request_is_record_seal_invalid(any_app):
    """Purpose EXPORT and a key the attacker wrapped to the job's public key."""
    app = any_app
    op_id, name, _ = _pending_import(app)
    row = _snapshot(app, "operations", "id", op_id)
    payload = json.loads(row["payload"])
    payload["purpose"] = "EXPORT"
    sql(app, "UPDATE operations SET payload=:p WHERE id=:i", p=json.dumps(payload), i=op_id)
    refused(keyadmin.approve, app, OFFICER_2, op_id)
    assert not _token_has(app, name)
    assert [o.seal_intact for o in keyadmin.list_operations(app)
            if o.operation_id == op_id] == [False]
    assert_audited(app, f"operations/{op_id}")


def test_a_hand_inserted_operation_is_record_seal_invalid(any_app):
    """A DESTROY_KEY that one officer 'approves' must not destroy the key."""
    app = any_app
    name, kit = _transport_key(app)
    now = dt.datetime.now(dt.timezone.utc)
    sql(app, "INSERT INTO operations (id, kind, target, state, requested_by, approvals, "
             "payload, message, created_at, updated_at, partition, seal) VALUES "
             "('op-forged', 'DESTROY_KEY', :n, 'PENDING', 'security-officer-1', :a, :p, '', "
             ":t, :t, 's1sp', :s)",
        n=name, a=json.dumps([{"officer": "security-officer-1", "digest": "0" * 64,
                               "mac": base64.b64encode(bytes(32)).decode()}]),
        p=json.dumps({"name": name}), t=now, s=bytes(32))
    refused(keyadmin.approve, app, OFFICER_2, "op-forged")
    assert keyadmin.get_key(app, name).state == "ENABLED"
    assert _token_has(app, name)
    assert kit.process(kit.file(kit.installations(1))).installations[0].status == "ACCEPTED"
    assert_audited(app, "operations/op-forged")


def test_an_older_copy_of_an_approved_operation_put_back_is_record_seal_invalid(any_app):
    app = any_app
    name, _kit = _transport_key(app)
    op = keyadmin.change_key_state(app, OFFICER_1, name, "DISABLE_KEY")
    pending = _snapshot(app, "operations", "id", op.operation_id)
    keyadmin.approve(app, OFFICER_2, op.operation_id)
    _state_change(app, name, "ENABLE_KEY")
    _restore(app, "operations", "id", pending)
    refused(keyadmin.approve, app, OFFICER_3, op.operation_id)
    assert keyadmin.get_key(app, name).state == "ENABLED"


def test_a_component_moved_to_another_operation_does_not_open(any_app):
    """Sealed components are bound to their operation and officer (GCM associated data)."""
    app = any_app
    key = os.urandom(32)
    c1 = os.urandom(32)
    ops = [keyadmin.import_transport_key(app, OFFICER_1, name=unique("S1SP-TK"),
                                         purpose="S1SP_TRANSPORT", owner_id="SMSO-LG-01",
                                         owner_type="SMSO", expected_kcv=enc.kcv(key),
                                         component=c1) for _ in range(2)]
    first = json.loads(_snapshot(app, "operations", "id", ops[0].operation_id)["payload"])
    second = json.loads(_snapshot(app, "operations", "id", ops[1].operation_id)["payload"])
    second["components"] = first["components"]
    sql(app, "UPDATE operations SET payload=:p WHERE id=:i", p=json.dumps(second),
        i=ops[1].operation_id)
    refused(keyadmin.approve, app, OFFICER_2, ops[1].operation_id,
            component=bytes(a ^ b for a, b in zip(key, c1)))


# --------------------------------------------------------------------------- import jobs
def test_an_import_job_public_key_swapped_in_the_database_is_record_seal_invalid(any_app):
    app = any_app
    job = keyadmin.create_import_job(app, OFFICER_1, "job", "S1SP_TRANSPORT")
    other = keyadmin.create_import_job(app, OFFICER_1, "other", "S1SP_TRANSPORT")
    sql(app, "UPDATE import_jobs SET public_key_pem=:p WHERE id=:i", p=other.public_key_pem,
        i=job.import_job_id)
    key = os.urandom(32)
    refused(keyadmin.import_transport_key, app, OFFICER_1, name=unique("S1SP-TK"),
            purpose="S1SP_TRANSPORT", owner_id="SMSO-LG-01", owner_type="SMSO",
            expected_kcv=enc.kcv(key), wrapped_key=wrap_for_job(other.public_key_pem, key),
            import_job_id=job.import_job_id)
    assert_audited(app, f"import_jobs/{job.import_job_id}")


# --------------------------------------------------------------------------- escrow
def _escrow(app) -> tuple[str, str]:
    from tests.test_escrow import _deposit_for_seal, set_clock, utc
    eid, chf = _deposit_for_seal(app)
    set_clock(app, utc(2026, 7, 3, 12))
    return eid, chf


def test_a_deleted_escrow_chf_index_row_hides_nothing_and_is_audited(any_app):
    """The anchor names the record's CHFs: the sealed record is found without the index
    (the attack, hiding the escrow from its release, fails), and the gap is audited."""
    app = any_app
    eid, chf = _escrow(app)
    sql(app, "DELETE FROM escrow_chfs WHERE escrow_id=:e", e=eid)
    (listed,) = escrow.list_escrows(app, chf_identifier=chf)
    assert (listed.escrow_id, listed.seal_intact) == (eid, True)
    assert escrow.release(app, S1SP, chf, "rolled back").escrow_id == eid
    assert count(app, st.escrow_releases) == 1
    assert_audited(app, f"escrow_chfs/{eid}")


def test_a_deleted_escrow_record_is_found_by_release_and_listing(any_app):
    app = any_app
    eid, chf = _escrow(app)
    sql(app, "DELETE FROM escrow_chfs WHERE escrow_id=:e", e=eid)
    sql(app, "DELETE FROM escrows WHERE id=:e", e=eid)
    err = refused(escrow.release, app, S1SP, chf, "rolled back", code="ESCROW_SEAL_INVALID")
    assert eid in err.message
    (listed,) = escrow.list_escrows(app, chf_identifier=chf)
    assert (listed.escrow_id, listed.seal_intact, listed.chf_identifiers) == (eid, False, (chf,))
    assert [e.escrow_id for e in escrow.list_escrows(app) if not e.seal_intact] == [eid]
    assert_audited(app, f"escrows/{eid}")


# --------------------------------------------------------------------------- through a server
@pytest.fixture(scope="module")
def tamper_server(tmp_path_factory):
    from tests.serverproc import start_server
    srv = start_server(tmp_path_factory.mktemp("tamper"))
    yield srv
    srv.stop()


@pytest.mark.parametrize("edit", ["owner_id='ATTACKER'", "created_at='not a date'",
                                  "seal=NULL"])
def test_a_tampered_key_record_through_the_server_is_failed_precondition_and_audited(
        tamper_server, edit):
    import sqlite3

    import grpc

    from keysvc.api.v1 import keysvc_pb2 as pb
    from keysvc.client import error_reason
    srv = tamper_server
    name = unique("S1SP-TK")
    srv.import_aes_key(name, os.urandom(32), purpose="S1SP_TRANSPORT", owner_id="SMSO-LG-01")
    with sqlite3.connect(srv.state_dir / "keysvc.db") as db:
        db.execute(f"UPDATE keys SET {edit} WHERE name=?", (name,))
    admin = srv.as_("security-officer-1").admin
    with pytest.raises(grpc.RpcError) as info:
        admin.GetKey(pb.GetKeyRequest(name=name))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(info.value) == "RECORD_SEAL_INVALID"
    events = srv.as_("auditor").audit.ListAuditEvents(
        pb.ListAuditEventsRequest(page_size=1000)).events
    assert any(e.action == "record.seal_invalid" and e.target.startswith(f"keys/{name}")
               for e in events)
    assert any(e.action.endswith("/GetKey") and e.code == "RECORD_SEAL_INVALID"
               and e.outcome == "ERROR" for e in events)
    assert "INTERNAL" not in {e.code for e in events}


# --------------------------------------------------------------------------- crash windows
@pytest.fixture()
def crash_after_commit(monkeypatch):
    """What a kill -9 right after a commit leaves (and an HSM error there): the anchor the
    change replaced is still in the token, and nothing after the commit ran."""
    from keysvc.anchors import Anchors
    real = Anchors._forget

    def forget(self, anchors, after):
        if after != "commit":
            real(self, anchors, after)
    monkeypatch.setattr(Anchors, "_forget", forget)
    monkeypatch.setattr(keyadmin._TokenEffects, "after_commit", lambda self, app: None)
    return monkeypatch


def test_an_older_copy_put_back_in_a_crash_window_is_refused_and_start_up_rolls_forward(
        any_app, crash_after_commit):
    """Two anchors after the crash: only the newer generation counts, and start-up puts the
    token's newest record back; the destroyed key's object goes then."""
    from keysvc.records.reconcile import reconcile
    app = any_app
    name, kit = _transport_key(app)
    enabled = _snapshot(app, "keys", "name", name)
    _state_change(app, name, "DESTROY_KEY")
    crash_after_commit.undo()
    _restore(app, "keys", "name", enabled)
    refused(kit.process, kit.file(kit.installations(1)))
    reconcile(app.records)  # the next start
    assert keyadmin.get_key(app, name).state == "DESTROYED"
    assert not _token_has(app, name)
    refused(kit.process, kit.file(kit.installations(1)), code="UNKNOWN_TRANSPORT_KEY")


def test_a_pending_copy_of_an_approved_operation_cannot_destroy_its_key_at_start(
        any_app, crash_after_commit):
    from keysvc.records.reconcile import reconcile
    app = any_app
    op_id, name, _ = _pending_import(app)
    pending = _snapshot(app, "operations", "id", op_id)
    keyadmin.approve(app, OFFICER_2, op_id)
    crash_after_commit.undo()
    _restore(app, "operations", "id", pending)
    sql(app, "DELETE FROM keys WHERE name=:n", n=name)
    refused(keyadmin.approve, app, OFFICER_3, op_id)
    reconcile(app.records)
    assert _token_has(app, name)
    assert keyadmin.get_key(app, name).state == "ENABLED"  # rolled forward from the token
    assert [o.state for o in keyadmin.list_operations(app)
            if o.operation_id == op_id] == ["APPROVED"]


def test_an_escrow_release_undone_in_a_crash_window_is_refused_and_rolled_forward(
        any_app, crash_after_commit):
    from tests.test_escrow import _deposit_for_seal, set_clock, utc
    app = any_app
    eid, chf = _deposit_for_seal(app, max_releases=1)
    set_clock(app, utc(2026, 7, 3, 12))
    before = _snapshot(app, "escrows", "id", eid)
    escrow.release(app, S1SP, chf, "one")
    crash_after_commit.undo()
    _restore(app, "escrows", "id", before)
    sql(app, "DELETE FROM escrow_releases WHERE escrow_id=:e", e=eid)
    refused(escrow.release, app, S1SP, chf, "two", code="ESCROW_SEAL_INVALID")
    assert app.records.escrows.roll_forward() == 1
    refused(escrow.release, app, S1SP, chf, "three", code="ESCROW_EXHAUSTED")


# --------------------------------------------------------------------------- more tamper cases
@pytest.mark.parametrize("edit", ["deposited_at='not a date'", "seal='text'", "note=X'00'",
                                  "valid_from='garbage'", "chf_identifiers='not json'",
                                  "certificates='[1]'"])
def test_an_escrow_row_altered_past_parsing_is_escrow_seal_invalid_never_internal(any_app,
                                                                                   edit):
    from tests.test_escrow import _deposit_for_seal, set_clock, utc
    app = any_app
    if app.store.is_sqlite is False and edit.startswith(("deposited_at", "seal", "note")):
        pytest.skip("PostgreSQL refuses that value itself")
    eid, chf = _deposit_for_seal(app)
    set_clock(app, utc(2026, 7, 3, 12))
    sql(app, f"UPDATE escrows SET {edit} WHERE id=:e", e=eid)
    refused(escrow.release, app, S1SP, chf, "x", code="ESCROW_SEAL_INVALID")
    refused(escrow.revoke, app, OFFICER_1, eid, code="ESCROW_SEAL_INVALID")
    try:
        listed = escrow.list_escrows(app)
    except KeysvcError as exc:
        assert exc.code == "ESCROW_SEAL_INVALID"
    else:
        assert [(e.escrow_id, e.seal_intact) for e in listed] == [(eid, False)]


def test_a_key_may_not_be_named_like_keysvcs_own_token_objects(any_app):
    for name in ("import-job:ij-0123", "rec:x:key/K", "storage-key", "escrow-anchor:e"):
        refused(keyadmin.generate_recipient_key, any_app, OFFICER_1, name=name,
                purpose="S1SP_TRANSPORT", allowed_originators=["SMSO-LG-01"],
                code="INVALID_REQUEST")


def test_a_filtered_listing_still_shows_a_record_altered_out_of_its_filter(any_app):
    app = any_app
    name, _kit = _transport_key(app)
    sql(app, "UPDATE keys SET purpose='EXPORT' WHERE name=:n", n=name)
    listed = {k.name: k.seal_intact for k in keyadmin.list_keys(app, "S1SP_TRANSPORT")}
    assert listed[name] is False
    assert_audited(app, f"keys/{name}")


def test_a_file_whose_result_row_was_deleted_is_record_seal_invalid_when_sent_again(any_app):
    app = any_app
    m = Made(app, n=2)
    dco.process_master_keys(app, S1SP, m.xml, store=True)
    sql(app, "DELETE FROM migration_files")
    refused(dco.process_master_keys, app, S1SP, m.xml, store=True)
    assert_audited(app, "migration_files/dco/")


def test_a_result_row_committed_between_the_two_reads_is_no_tamper(any_app, monkeypatch):
    """The file's row and its keys commit together; a sender of the same file that read
    "no row" just before and "keys" just after that commit gets the stored result (seen
    with eight connections at once), not RECORD_SEAL_INVALID."""
    app = any_app
    m = Made(app, n=2)
    first = dco.process_master_keys(app, S1SP, m.xml, store=True)
    real, calls = app.records.files.get, []

    def not_yet_committed(*args):
        calls.append(args)
        return None if len(calls) == 1 else real(*args)
    monkeypatch.setattr(app.records.files, "get", not_yet_committed)
    again = dco.process_master_keys(app, S1SP, m.xml, store=True)
    assert again == first and len(calls) == 2


def test_a_database_whose_instance_id_was_changed_does_not_start(app):
    with app.partitions.admin.session() as s:
        before = hk.data_values(s, "keysvc-instance")
    try:
        app.records.ensure_instance(dev=False)
        sql(app, "UPDATE instance SET instance_id='someone-elses'")
        app.records._instance = ""  # what a restart reads
        with pytest.raises(SystemExit):
            app.records.ensure_instance(dev=False)
    finally:
        with app.partitions.admin.session() as s:
            hk.destroy_data(s, "keysvc-instance", lambda v: v not in before)


def test_an_approved_import_stays_intact_with_the_request_its_approvals_name(any_app):
    app = any_app
    op_id, name, _ = _pending_import(app)
    keyadmin.approve(app, OFFICER_2, op_id)
    (op,) = [o for o in keyadmin.list_operations(app) if o.operation_id == op_id]
    assert (op.state, op.seal_intact) == ("APPROVED", True)
    with app.store.engine.connect() as conn:
        assert app.records.operations.get(conn, op_id).state == "APPROVED"


# ------------------------------------------------------------- start-up decides on the token's word
def _insert(app, table: str, row: dict) -> None:
    cols = ", ".join(row)
    sql(app, f"INSERT INTO {table} ({cols}) VALUES ({', '.join(':' + c for c in row)})", **row)


def test_start_up_rolls_a_deleted_key_and_an_edited_operation_back_from_the_token(any_app):
    """Decisions come from anchors, never rows: an operation edited in place (its seal
    column untouched) cannot make start-up forget the key it made."""
    from keysvc.records.reconcile import reconcile
    app = any_app
    name, kit = _transport_key(app)
    op_id = _snapshot(app, "keys", "name", name)["key_id"]
    sql(app, "UPDATE operations SET message='x' WHERE id=:i", i=op_id)
    sql(app, "DELETE FROM keys WHERE name=:n", n=name)
    reconcile(app.records)
    assert keyadmin.get_key(app, name).state == "ENABLED"
    assert kit.process(kit.file(kit.installations(1))).installations[0].status == "ACCEPTED"
    assert [o.seal_intact for o in keyadmin.list_operations(app)
            if o.operation_id == op_id] == [True]


def test_a_name_is_one_key_across_partitions_even_when_its_row_is_deleted(any_app):
    app = any_app
    name = unique("TK")
    load_aes_key(app, name, os.urandom(32), purpose="DCO_TRANSPORT", owner_id="SMSO-LG-01")
    sql(app, "DELETE FROM keys WHERE name=:n", n=name)
    refused(load_aes_key, app, name, os.urandom(32), purpose="S1SP_TRANSPORT",
            owner_id="SMSO-LG-01", code="KEY_EXISTS")


def test_a_key_change_whose_operation_never_anchored_is_discarded_at_start(app, monkeypatch):
    """An approval cut (kill -9, or an HSM error its rollback cannot undo) after the key's
    new anchor and before its operation's: the change never committed, so start-up removes
    that anchor; the key and its material stay, the operation stays PENDING."""
    from keysvc.anchors import Anchors
    from keysvc.records.reconcile import reconcile
    name, kit = _transport_key(app)
    op = keyadmin.change_key_state(app, OFFICER_1, name, "DESTROY_KEY")

    def cut(*args, **kwargs):
        raise RuntimeError("cut")
    monkeypatch.setattr(Anchors, "_forget", lambda self, anchors, after: None)
    monkeypatch.setattr(app.records.operations, "update", cut)
    with pytest.raises(RuntimeError):
        keyadmin.approve(app, OFFICER_2, op.operation_id)
    monkeypatch.undo()
    reconcile(app.records)
    assert keyadmin.get_key(app, name).state == "ENABLED"
    assert _token_has(app, name)
    assert [o.state for o in keyadmin.list_operations(app)
            if o.operation_id == op.operation_id] == ["PENDING"]


def test_a_replica_starting_during_an_approval_waits_for_it_and_keeps_the_new_key(app,
                                                                                 monkeypatch):
    import threading
    import time

    from keysvc import faults
    from keysvc.records.reconcile import reconcile
    from tests.conftest import make_app
    other = make_app(app.settings.state_dir, app.partitions, str(app.store.engine.url))
    key, c1 = os.urandom(32), os.urandom(32)
    name = unique("S1SP-TK")
    op = keyadmin.import_transport_key(app, OFFICER_1, name=name, purpose="S1SP_TRANSPORT",
                                       owner_id="SMSO-LG-01", owner_type="SMSO",
                                       expected_kcv=enc.kcv(key), component=c1)
    started = threading.Event()
    replica = threading.Thread(target=lambda: (started.set(), reconcile(other.records)))
    real = faults.point

    def point(where):
        if where == "approve.after_token_object":
            replica.start()     # replica B starts while A's object has no record yet
            started.wait()
            time.sleep(0.5)     # ... and reaches the operation's lock
        real(where)
    monkeypatch.setattr(faults, "point", point)
    keyadmin.approve(app, OFFICER_2, op.operation_id,
                     component=bytes(a ^ b for a, b in zip(key, c1)))
    replica.join(60)
    monkeypatch.undo()
    assert keyadmin.get_key(app, name).state == "ENABLED"
    assert _token_has(app, name)
    other.store.close()


@pytest.mark.parametrize("edit", ["keys:seal='text'", "escrows:deposited_at='not a date'"])
def test_one_altered_row_never_stops_the_start(app, edit):
    from keysvc.records.reconcile import reconcile
    from tests.test_escrow import _deposit_for_seal
    table, change = edit.split(":")
    if table == "keys":
        name, _ = _transport_key(app)
        sql(app, f"UPDATE keys SET {change} WHERE name=:n", n=name)
        reconcile(app.records)
        assert keyadmin.get_key(app, name).state == "ENABLED"  # rolled forward, repaired
    else:
        eid, _ = _deposit_for_seal(app)
        sql(app, f"UPDATE escrows SET {change} WHERE id=:e", e=eid)
        app.records.escrows.roll_forward()


def test_an_operation_with_an_unknown_partition_is_listed_as_altered(any_app):
    app = any_app
    name, _ = _transport_key(app)
    op = keyadmin.change_key_state(app, OFFICER_1, name, "DESTROY_KEY")
    sql(app, "UPDATE operations SET partition='zzz' WHERE id=:i", i=op.operation_id)
    assert [o.seal_intact for o in keyadmin.list_operations(app)
            if o.operation_id == op.operation_id] == [False]


def test_a_file_sent_again_after_its_keys_file_id_was_moved_is_record_seal_invalid(
        s1sp_world):
    app, _ = s1sp_world
    kit = Kit(app)
    fid = unique("MGEF")
    data = kit.file(kit.installations(1), file_id=fid)
    assert kit.process(data).installations[0].status == "ACCEPTED"
    sql(app, "UPDATE device_keys SET file_id='elsewhere' WHERE file_id=:f", f=fid)
    sql(app, "DELETE FROM migration_files WHERE file_id=:f", f=fid)
    refused(kit.process, data)


@pytest.mark.parametrize("table,edit,rpc", [
    ("keys", "purpose='BOGUS'", "ListKeys"),
    ("keys", "state='BOGUS'", "ListKeys"),
    ("keys", "allowed_originators='[1]'", "ListKeys"),
    ("operations", "state='BOGUS'", "ListOperations"),
    ("operations", "state='PENDING', created_at='9999-12-31 23:00:00.000000'",
     "ListOperations")])
def test_an_altered_record_is_listed_as_altered_never_internal(tamper_server, table, edit,
                                                                rpc):
    import sqlite3

    from keysvc.api.v1 import keysvc_pb2 as pb
    srv = tamper_server
    name = unique("S1SP-TK")
    srv.import_aes_key(name, os.urandom(32), purpose="S1SP_TRANSPORT", owner_id="SMSO-LG-01")
    column = "name" if table == "keys" else "target"
    with sqlite3.connect(srv.state_dir / "keysvc.db") as db:
        db.execute(f"UPDATE {table} SET {edit} WHERE {column}=?", (name,))
    response = getattr(srv.as_("security-officer-1").admin, rpc)(
        getattr(pb, f"{rpc}Request")())
    listed = response.keys if table == "keys" else response.operations
    altered = [x for x in listed if not x.seal_intact]
    assert altered and all(x.state == 0 for x in altered)


@pytest.mark.parametrize("edit", ["kcv=X'41'", "seal='text'", "wrapped='text'",
                                  "key_version='x'"])
def test_a_stored_key_column_of_another_type_is_record_seal_invalid_never_internal(
        s1sp_world, edit):
    app, (a, _b) = s1sp_world
    if not app.store.is_sqlite:
        pytest.skip("PostgreSQL refuses a value of another type itself")
    sql(app, f"UPDATE device_keys SET {edit} WHERE device_id=:a", a=a.esme)
    refused(s1sp.verify_prepayment_key, app, a.esme, prepay(a))
    assert_audited(app, "device_keys/" + a.esme)


def test_a_replica_starting_during_an_approval_that_then_fails_rolls_nothing_forward(
        app, monkeypatch):
    """Replica B starts while A's DISABLE approval has anchored the key and the operation
    and then fails before its commit. A removes its anchors before it lets go of the rows;
    B, waiting on them, finds the anchors moved and leaves the records as they are."""
    import threading
    import time

    from keysvc import faults
    from keysvc.records.reconcile import reconcile
    from tests.conftest import make_app
    other = make_app(app.settings.state_dir, app.partitions, str(app.store.engine.url))
    name, kit = _transport_key(app)
    op = keyadmin.change_key_state(app, OFFICER_1, name, "DISABLE_KEY")
    replica = threading.Thread(target=lambda: reconcile(other.records))

    def point(where):
        if where == "approve.before_commit":
            replica.start()
            time.sleep(1.5)  # B has read the anchors and waits for the rows
            raise RuntimeError("the commit fails")
    monkeypatch.setattr(faults, "point", point)
    with pytest.raises(RuntimeError):
        keyadmin.approve(app, OFFICER_2, op.operation_id)
    replica.join(60)
    monkeypatch.undo()
    reconcile(app.records)
    assert keyadmin.get_key(app, name).state == "ENABLED"
    assert kit.process(kit.file(kit.installations(1))).installations[0].status == "ACCEPTED"
    assert [o.state for o in keyadmin.list_operations(app)
            if o.operation_id == op.operation_id] == ["PENDING"]
    other.store.close()
