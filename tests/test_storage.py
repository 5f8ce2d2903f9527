"""The storage rules, run against both stores: SQLite (embedded) and PostgreSQL."""
from __future__ import annotations

import datetime as dt
import os
import threading

import pytest
from sqlalchemy import func, select, text

from keysvc import escrow, s1sp
from keysvc import store as st
from keysvc.device_certificate import TrustStore
from keysvc.errors import KeysvcError
from tests.conftest import OFFICER_1, S1SP, unique
from tests.keyloading import load_aes_key
from tests.support import certs, encoder


def _keys(app):
    s1sp_kek, dco_kek = os.urandom(32), os.urandom(32)
    names = unique("S1SP-TK"), unique("DCO-TK")
    load_aes_key(app, names[0], s1sp_kek, purpose="S1SP_TRANSPORT", owner_id="SMSO-1")
    load_aes_key(app, names[1], dco_kek, purpose="DCO_TRANSPORT", owner_id="SMSO-1")
    return dict(s1sp_key_name=names[0], s1sp_kek=s1sp_kek, dco_key_name=names[1],
                dco_kek=dco_kek)


def _file(app, n=3, file_id=None):
    factory = encoder.DeviceCertificateFactory()
    app.trust = TrustStore(anchors=(factory.ca_cert,))
    installs = encoder.random_installations(n, cert_factory=factory)
    return encoder.build_file(installs, file_id=file_id or unique("MGEF"),
                              originator_id="SMSO-1", **_keys(app)), installs


def _count(app, table) -> int:
    with app.store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def test_schema_migrations_are_versioned_and_apply_twice_without_change(any_app):
    any_app.store.migrate()
    with any_app.store.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0005"


def test_same_file_on_eight_threads_at_once_is_stored_once(any_app):
    data, installs = _file(any_app)
    results, errors = [], []

    def call():
        try:
            results.append(s1sp.process_group_information(any_app, S1SP, data))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=call) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert all(r == results[0] for r in results)
    assert _count(any_app, st.migration_files) == 1
    expected_keys = sum(len(i.esme_secret_keys()) if False else
                        2 + (i.prepay_key is not None) + (i.gsme_prepay_key is not None)
                        for i in installs)
    assert _count(any_app, st.device_keys) == expected_keys


def test_file_level_failure_writes_no_row(any_app):
    data, _ = _file(any_app)
    bad = encoder.set_text(data, "m:MigrationHeader/m:OriginatorType", "RequestingParty")
    with pytest.raises(KeysvcError):
        s1sp.process_group_information(any_app, S1SP, bad)
    assert _count(any_app, st.migration_files) == 0
    assert _count(any_app, st.device_keys) == 0


def test_audit_chain_stays_one_valid_chain_under_concurrent_appends(any_app):
    def append(i):
        for j in range(10):
            any_app.audit.append(actor=f"t{i}", role="s1sp", action="test", target=str(j))
    threads = [threading.Thread(target=append, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    v = any_app.audit.verify()
    assert v.intact and v.events_checked == 60


def test_last_escrow_release_is_won_by_exactly_one_of_two_threads(any_app):
    ca, ca_key = certs.make_ca("Rollback CA")
    today = dt.date.today()
    escrow.deposit(any_app, OFFICER_1, smso_id="SMSO-1", group_id="EA",
                   chf_identifiers=["00-11-22-33-44-55-66-77"], certificates=[certs.der(ca)],
                   valid_from=today - dt.timedelta(days=1), valid_to=today + dt.timedelta(days=1),
                   max_releases=1)
    outcomes = []
    barrier = threading.Barrier(2)

    def release():
        barrier.wait()
        try:
            escrow.release(any_app, S1SP, "00-11-22-33-44-55-66-77", "rollback")
            outcomes.append("released")
        except KeysvcError as exc:
            outcomes.append(exc.code)
    threads = [threading.Thread(target=release) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(outcomes) == ["ESCROW_EXHAUSTED", "released"]
