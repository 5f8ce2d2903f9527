"""Tree seals (keysvc/records/tree_seal.py): stored keys are sealed 16 under one HSM HMAC,
and each row still verifies on its own against an untrusted database.

The attacks of test_untrusted_storage.py (rows swapped, copied, relabelled) run on tree
seals already, since every stored key is written with one; these are the rules of the tree
itself: its seals' shape, and what a database writer can do with them.
"""
from __future__ import annotations

import os

import pytest

from keysvc import dco, s1sp
from keysvc.records import tree_seal
from keysvc.records.seal import canonical
from tests.conftest import DCO
from tests.support import encoder as enc
from tests.test_dco import Made
from tests.test_untrusted_storage import assert_audited, refused, sql


def _seals(app, table: str) -> dict[str, bytes]:
    with app.store.engine.connect() as conn:
        from sqlalchemy import text
        return {f"{r[0]}/{r[1]}": bytes(r[2]) for r in conn.execute(text(
            f"SELECT device_id, {'role' if table == 'device_keys' else 'chf_identifier'}, "
            f"seal FROM {table} ORDER BY device_id"))}


@pytest.fixture()
def master_keys(any_app):
    """20 master keys stored from one file: a tree of 16 and a tree of 4."""
    m = Made(any_app, n=20)
    dco.process_master_keys(any_app, DCO, m.xml, store=True)
    return any_app, m


# --------------------------------------------------------------------------- the trees
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 16])
def test_every_leaf_of_a_tree_opens_to_the_one_root_that_was_maced(n):
    datas = [os.urandom(40 + i) for i in range(n)]
    maced = []
    seals = tree_seal.seals(datas, lambda m: maced.append(m) or b"M" * 32)
    assert len(maced) == 1  # one HMAC for the whole tree
    for d, s in zip(datas, seals):
        assert tree_seal.opened(d, s) == (maced[0], b"M" * 32)
    depth = (n - 1).bit_length()  # a node without a sibling goes up without one
    assert max(len(s) for s in seals) == tree_seal.HEADER + 32 * depth


def test_the_root_message_is_the_records_canonical_encoding_of_its_own_kind():
    root = os.urandom(32)
    assert tree_seal.root_message(root, 16) == canonical(tree_seal.KIND, 16, root)


def test_a_seal_header_changed_to_another_leaf_count_does_not_open():
    """The count is inside the MAC: a header naming another count (one that walks the same
    path for this leaf) gives another message."""
    datas = [os.urandom(40) for _ in range(10)]
    seals = tree_seal.seals(datas, lambda m: b"M" * 32)
    good = tree_seal.opened(datas[0], seals[0])
    for count in (9, 11, 12, 16):
        s = bytearray(seals[0])
        s[2] = count
        assert tree_seal.opened(datas[0], bytes(s)) != good


def test_a_leaf_opens_only_with_its_own_record_place_and_path():
    datas = [os.urandom(50) for _ in range(5)]
    seals = tree_seal.seals(datas, lambda m: b"M" * 32)
    good = tree_seal.opened(datas[2], seals[2])
    assert tree_seal.opened(datas[3], seals[2]) != good           # another record
    s = bytearray(seals[2])
    s[1] = 3                                                       # another place
    assert tree_seal.opened(datas[2], bytes(s)) != good
    s = bytearray(seals[2])
    s[-1] ^= 1                                                     # a sibling changed
    assert tree_seal.opened(datas[2], bytes(s)) != good
    assert tree_seal.opened(datas[2], seals[2][:-32]) is None      # a sibling short
    assert tree_seal.opened(datas[2], seals[2] + b"\0" * 32) is None  # one too many
    s = bytearray(seals[2])
    s[2] = 17                                                      # more leaves than a tree
    assert tree_seal.opened(datas[2], bytes(s)) is None


def test_an_inner_node_cannot_stand_for_a_record():
    """Leaves and nodes are hashed apart (0x00, 0x01): the two children of a node, written
    as one record, are not a leaf of that node."""
    datas = [os.urandom(40) for _ in range(4)]
    seals = tree_seal.seals(datas, lambda m: b"M" * 32)
    left, right = tree_seal.leaf(datas[0]), tree_seal.leaf(datas[1])
    forged = bytes((tree_seal.FORMAT, 0, 2)) + seals[0][3:tree_seal.HEADER] + seals[0][-32:]
    assert tree_seal.opened(left + right, forged) != tree_seal.opened(datas[0], seals[0])


# --------------------------------------------------------------------------- stored keys
def test_stored_keys_are_sealed_sixteen_under_one_hsm_mac(master_keys):
    app, m = master_keys
    seals = list(_seals(app, "master_keys").values())
    assert len(seals) == 20
    assert all(tree_seal.is_tree_seal(s) for s in seals)
    roots = {s[3:tree_seal.HEADER] for s in seals}
    assert len(roots) == 2  # 20 rows: a tree of 16 and a tree of 4
    assert sorted(s[2] for s in seals) == [4] * 4 + [16] * 16


def test_a_seal_moved_to_another_row_of_its_own_tree_is_record_seal_invalid(master_keys):
    app, m = master_keys
    a, b = m.insts[0], m.insts[1]
    seals = _seals(app, "master_keys")
    seal_b = next(s for k, s in seals.items() if k.startswith(b.esme))
    sql(app, "UPDATE master_keys SET seal=:s WHERE device_id=:a", s=seal_b, a=a.esme)
    refused(dco.verify_master_key, app, a.esme, enc.kcv(a.master_key))
    assert_audited(app, "master_keys/" + a.esme)
    assert dco.verify_master_key(app, b.esme, enc.kcv(b.master_key))  # its owner still opens


def test_a_sealed_row_of_another_device_answered_by_the_database_is_refused(master_keys,
                                                                            monkeypatch):
    """The WHERE of a read is the database's word: a database server that answers with
    another device's (well-sealed) row is refused, not believed."""
    app, m = master_keys
    a, b = m.insts[0], m.insts[1]
    real = app.records.fetch

    def lying(conn, query, record, *, one=True, params=None):
        asked = dict(params or {})
        if asked.get("device_id") == a.esme:
            asked["device_id"] = b.esme
        return real(conn, query, record, one=one, params=asked)
    monkeypatch.setattr(app.records, "fetch", lying)
    refused(dco.verify_master_key, app, a.esme, enc.kcv(b.master_key))
    assert_audited(app, "master_keys/" + b.esme)
    assert dco.verify_master_key(app, b.esme, enc.kcv(b.master_key))


@pytest.mark.parametrize("edit", ["place", "sibling", "root", "short", "long", "format"])
def test_an_edited_tree_seal_is_record_seal_invalid_never_internal(master_keys, edit):
    app, m = master_keys
    a = m.insts[0]
    seal = bytearray(next(s for k, s in _seals(app, "master_keys").items()
                          if k.startswith(a.esme)))
    if edit == "place":
        seal[1] = (seal[1] + 1) % seal[2]
    elif edit == "sibling":
        seal[-1] ^= 1
    elif edit == "root":
        seal[3] ^= 1
    elif edit == "short":
        seal = seal[:-1]
    elif edit == "long":
        seal += b"\0" * 32
    else:
        seal[0] = 2
    sql(app, "UPDATE master_keys SET seal=:s WHERE device_id=:a", s=bytes(seal), a=a.esme)
    refused(dco.verify_master_key, app, a.esme, enc.kcv(a.master_key))
    assert_audited(app, "master_keys/" + a.esme)


def test_a_classic_seal_written_before_tree_seals_still_opens(master_keys):
    """Rows sealed one HMAC each (before tree seals) keep verifying: the 32-byte form."""
    app, m = master_keys
    a = m.insts[0]
    repo = app.records.master_keys
    (k,) = repo.get(a.esme)
    classic = app.records.sealers["dco"].seal(repo.canonical(k))
    assert len(classic) == 32
    sql(app, "UPDATE master_keys SET seal=:s WHERE device_id=:a", s=classic, a=a.esme)
    assert dco.verify_master_key(app, a.esme, enc.kcv(a.master_key))


def test_tree_seals_open_only_where_a_caller_accepts_them(any_app):
    """A tree seal is no seal for a record that is sealed alone (files, keys, operations):
    `Sealer.valid_many` takes one only when asked."""
    from keysvc.records.tree_seal import TreeSealer
    record = canonical("migration-file", "MGEF-1", "s1sp", "digest", "{}")

    def seal(sess):
        sess.retire_after_use()
        sealer = TreeSealer(sess, lambda r: r)
        sealer.add(record)
        return sealer.finish()[0]
    made = any_app.partitions.s1sp.run(seal)
    sealer = any_app.records.sealers["s1sp"]
    assert sealer.valid_many([(record, made)], trees=True) == [True]
    assert sealer.valid_many([(record, made)]) == [False]
    assert sealer.valid(record, made) is False


def test_device_keys_of_one_file_share_roots_and_each_verifies_alone(any_app):
    from keysvc.device_certificate import TrustStore
    from tests.test_s1sp_validation import FACTORY, KW_KEY, KW_NAME, Kit, ensure_key
    any_app.trust = TrustStore(anchors=(FACTORY.ca_cert,))
    ensure_key(any_app, KW_NAME, aes=KW_KEY, purpose="S1SP_TRANSPORT")
    kit = Kit(any_app)
    insts = kit.installations(6)  # EA: 4 keys each, 24 rows, two trees
    result = kit.process(kit.file(insts))
    assert result.accepted_count == 6
    seals = _seals(any_app, "device_keys").values()
    assert len({s[3:tree_seal.HEADER] for s in seals}) == 2
    for i in insts:
        assert s1sp.verify_prepayment_key(any_app, i.esme, enc.kcv(i.prepay_key))


# --------------------------------------------------------------------------- only rows stored
def assert_only_stored_rows_share_trees(app, table: str) -> None:
    """Every tree's leaves are all in the table: a row sealed and then dropped would share
    a tree with stored rows, and its seal could be rebuilt from theirs."""
    from collections import Counter
    seals = list(_seals(app, table).values())
    per_root = Counter(s[3:tree_seal.HEADER] for s in seals)
    for s in seals:
        assert s[2] == per_root[s[3:tree_seal.HEADER]], (table, s[2], per_root)


def test_an_installation_whose_certificate_fails_shares_no_seal_tree(any_app):
    """Its keys are wrapped while the certificates are checked; it is rejected after, and
    the rows are sealed only then."""
    from keysvc.device_certificate import TrustStore
    from tests.test_s1sp_validation import FACTORY, KW_KEY, KW_NAME, Kit, ensure_key
    any_app.trust = TrustStore(anchors=(FACTORY.ca_cert,))
    ensure_key(any_app, KW_NAME, aes=KW_KEY, purpose="S1SP_TRANSPORT")
    kit = Kit(any_app)
    insts = kit.installations(3)
    insts[1].certificate_der = FACTORY(insts[0].chf)  # names another CHF
    result = kit.process(kit.file(insts))
    assert [i.status for i in result.installations] == ["ACCEPTED", "REJECTED", "ACCEPTED"]
    assert_only_stored_rows_share_trees(any_app, "device_keys")


def test_master_keys_assembled_again_after_a_race_share_no_seal_tree(app, monkeypatch):
    """Another file stores one of the devices between the check and the write: the entries
    are assembled again, and sealed again, without it."""
    from tests.test_dco import ORIGINATOR
    first = Made(app, n=3)
    dco.process_master_keys(app, DCO, first.xml, store=True)
    m = Made(app, n=3)
    m.insts[1].esme = first.insts[0].esme
    m.xml = enc.build_file(m.insts, group_id="EA", file_id=m.file_id, originator_type="SMSO",
                           originator_id=ORIGINATOR, s1sp_key_name="S1SP-NOT-LOADED",
                           s1sp_kek=os.urandom(32), dco_key_name=m.key_name, dco_kek=m.kek)
    check = dco._devices_already_stored
    calls = []

    def stale_first(app_, ids, file_id):
        calls.append(1)
        got = check(app_, ids, file_id)
        return [[] for _ in got] if len(calls) == 1 else got  # the first check misses it
    monkeypatch.setattr(dco, "_devices_already_stored", stale_first)
    r = dco.process_master_keys(app, DCO, m.xml, store=True)
    assert [e.status for e in r.entries] == ["ACCEPTED", "REJECTED", "ACCEPTED"]
    assert len(calls) == 2
    assert_only_stored_rows_share_trees(app, "master_keys")
