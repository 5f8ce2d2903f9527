"""Objects made without the PIN are never taken for keysvc's (review of issue 16).

Whoever reaches a token through its module without its PIN (the other organisation's
process on a shared HSM, a tool on the host) can still open a session and make *public*
token objects. keysvc makes every key and data object private, and finds only private ones:
a public `storage-key@v9` of a known value must not become the primary storage key, a
public roster must not enrol an officer, a public vouched list must not vouch.
"""
from __future__ import annotations

import json

import pytest
from pkcs11 import Attribute as A
from pkcs11 import KeyType, ObjectClass

from keysvc.custody import versions
from keysvc.hsm import HsmKeyNotFound
from keysvc.hsm import keys as hk
from keysvc.identity import roster as roster_mod
from keysvc.identity import vouched


@pytest.fixture()
def planted(app):
    """Public look-alikes in the S1SP and admin tokens, removed afterwards."""
    made = []
    with app.partitions.s1sp.session() as s:
        made.append((app.partitions.s1sp, s.raw.create_object({
            A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.AES, A.TOKEN: True,
            A.PRIVATE: False, A.LABEL: "storage-key@v9", A.VALUE: bytes(32),
            A.WRAP: True, A.UNWRAP: True, A.SENSITIVE: False, A.EXTRACTABLE: True})))
        made.append((app.partitions.s1sp, s.raw.create_object({
            A.CLASS: ObjectClass.DATA, A.TOKEN: True, A.PRIVATE: False,
            A.LABEL: vouched.LABEL, A.VALUE: json.dumps(
                {"generation": 10**9, "officers": ["ab" * 32]}).encode()})))
    with app.partitions.admin.session() as s:
        made.append((app.partitions.admin, s.raw.create_object({
            A.CLASS: ObjectClass.DATA, A.TOKEN: True, A.PRIVATE: False,
            A.LABEL: roster_mod.LABEL, A.VALUE: b'{"generation": 999999999}'})))
    yield app
    for token, obj in made:
        with token.session():
            obj.destroy()


def test_a_public_storage_key_version_is_not_a_version(planted):
    with planted.partitions.s1sp.session() as s:
        assert "storage-key@v9" not in hk.secret_key_labels(s)
        assert versions.storage(s)[0] < 9
        with pytest.raises(HsmKeyNotFound):
            hk.find_key(s, "storage-key@v9")


def test_a_public_data_object_is_not_read(planted):
    with planted.partitions.admin.session() as s:
        assert b'{"generation": 999999999}' not in hk.data_values(s, roster_mod.LABEL)
    with planted.partitions.s1sp.session() as s:
        assert not any(b"abab" in v for v in hk.data_values(s, vouched.LABEL))
