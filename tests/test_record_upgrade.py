"""The upgrade to sealed records: existing rows are trusted once, at the first start with
the HSM, and never again (README: threat model, upgrade)."""
from __future__ import annotations

import os

import pytest
from sqlalchemy import text

from keysvc import keyadmin
from keysvc.errors import KeysvcError
from keysvc.hsm import keys as hk
from keysvc.records.upgrade import MARKER, upgrade_once
from tests.conftest import OFFICER_1, unique
from tests.keyloading import load_aes_key


def _unseal_everything(app, name: str) -> None:
    """The database as 0.1 left it: no seals, no key ids, no anchors."""
    with app.store.engine.begin() as conn:
        for table in ("keys", "operations", "import_jobs", "migration_files", "device_keys",
                      "master_keys"):
            conn.execute(text(f"UPDATE {table} SET seal=NULL"))
        conn.execute(text("UPDATE keys SET key_id=''"))
    with app.partitions.s1sp.session() as s:
        hk.destroy_data(s, app.records.anchors("s1sp").label(f"key/{name}"))
        hk.set_id(s, name, "")


@pytest.fixture()
def no_marker(app):
    """This test plays a token set that has never been upgraded (the suite shares one)."""
    with app.partitions.admin.session() as s:
        hk.destroy_data(s, MARKER)
    yield
    with app.partitions.admin.session() as s:
        if not hk.data_values(s, MARKER):
            hk.put_data(s, MARKER, b"1")


def test_rows_from_before_seals_are_sealed_once_at_the_upgrade(app, no_marker):
    name = unique("S1SP-TK")
    load_aes_key(app, name, os.urandom(32), purpose="S1SP_TRANSPORT", owner_id="SMSO-LG-01")
    _unseal_everything(app, name)
    with pytest.raises(KeysvcError) as info:
        keyadmin.get_key(app, name)
    assert info.value.code == "RECORD_SEAL_INVALID"
    assert upgrade_once(app.records) is True
    assert keyadmin.get_key(app, name).state == "ENABLED"
    assert app.records.keys.get(name, for_use=True).key_id == f"legacy-{name}"
    assert all(o.seal_intact for o in keyadmin.list_operations(app))


def test_after_the_upgrade_an_unsealed_row_is_never_trusted_again(app, no_marker):
    name = unique("S1SP-TK")
    load_aes_key(app, name, os.urandom(32), purpose="S1SP_TRANSPORT", owner_id="SMSO-LG-01")
    assert upgrade_once(app.records) is True
    _unseal_everything(app, name)
    assert upgrade_once(app.records) is False
    with pytest.raises(KeysvcError) as info:
        keyadmin.get_key(app, name)
    assert info.value.code == "RECORD_SEAL_INVALID"
    with pytest.raises(KeysvcError):
        keyadmin.change_key_state(app, OFFICER_1, name, "DISABLE_KEY")
