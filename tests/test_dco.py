"""The DCO path (api.md DCOService; crypto profile, TMAD Clause 15.7).

In-process tests run keysvc.dco on the real SoftHSM2 tokens with a fresh database each;
transport keys get unique names (token objects outlive a test) and are loaded through the
real dual-control ceremony. The examples' own key names go only into this module's own
server, so nothing here collides with another test file loading the same examples.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from lxml import etree
from pkcs11 import Attribute
from sqlalchemy import func, select

from keysvc import dco, keyadmin
from keysvc import store as st
from keysvc.api.v1 import keysvc_pb2 as pb
from keysvc.client import error_reason
from keysvc.errors import KeysvcError
from tests.conftest import DCO, EXAMPLES, OFFICER_1, OFFICER_2, ROOT, unique
from tests.support import encoder as enc

EXAMPLE_DIRS = ("ea-kw", "eb-oaep", "aa-kw")
ORIGINATOR = "SMSO-LG-01"
DCO_KEY_NAME_PATH = "//m:MasterKeyEntry/xenc:EncryptedKey/ds:KeyInfo/ds:KeyName"
CIPHER_VALUE_PATH = "//m:MasterKeyEntry/xenc:EncryptedKey/xenc:CipherData/xenc:CipherValue"


# --------------------------------------------------------------------------- helpers
def _expect(name: str) -> dict:
    return json.loads((EXAMPLES / name / "expect.json").read_text())


def load_aes(app, name: str, key: bytes, *, purpose: str = "DCO_TRANSPORT",
             owner_id: str = ORIGINATOR, owner_type: str = "SMSO") -> None:
    """A transport key by two officers' components (the ceremony, without an RSA-3072
    import job per test: that costs about a second of key generation each)."""
    c1 = os.urandom(len(key))
    c2 = bytes(a ^ b for a, b in zip(key, c1))
    op = keyadmin.import_transport_key(app, OFFICER_1, name=name, purpose=purpose,
                                       owner_id=owner_id, owner_type=owner_type,
                                       expected_kcv=enc.kcv(key), component=c1)
    assert keyadmin.approve(app, OFFICER_2, op.operation_id, component=c2).state == "APPROVED"


_RSA: list[rsa.RSAPrivateKey] = []


def rsa_key(i: int = 0) -> rsa.RSAPrivateKey:
    while len(_RSA) <= i:
        _RSA.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return _RSA[i]


def load_rsa(app, name: str, private: rsa.RSAPrivateKey, originator: str = ORIGINATOR) -> None:
    keyadmin.register_existing_rsa_key(app, name=name, purpose="DCO_TRANSPORT",
                                       allowed_originators=[originator], private_key=private)


class Made:
    """An encoder-made file and what went into it."""

    def __init__(self, app, n: int = 4, *, group: str = "EA", rsa_kek: bool = False,
                 originator_type: str = "SMSO", file_id: str | None = None,
                 load: bool = True) -> None:
        self.insts = enc.random_installations(n, group=group)
        self.key_name = unique("DCO-TK")
        self.kek = rsa_key() if rsa_kek else os.urandom(32)
        self.file_id = file_id or unique("MGEF-DCO")
        if load:
            if rsa_kek:
                load_rsa(app, self.key_name, self.kek)
            else:
                load_aes(app, self.key_name, self.kek,
                         owner_type="REQUESTING_PARTY" if originator_type == "RequestingParty"
                         else "SMSO")
        self.xml = enc.build_file(self.insts, group_id=group, file_id=self.file_id,
                                  originator_type=originator_type, originator_id=ORIGINATOR,
                                  s1sp_key_name="S1SP-NOT-LOADED", s1sp_kek=os.urandom(32),
                                  dco_key_name=self.key_name, dco_kek=self.kek)

    def kcvs(self) -> list[str]:
        return [enc.kcv(i.master_key) for i in self.insts]

    def wrapped_entry(self, key: bytes, kek=None) -> str:
        return base64.b64encode(enc.wrap_key(key, self.kek if kek is None else kek)[1]).decode()


def codes(entry) -> list[str]:
    return [p.code for p in entry.problems]


def assert_entries(result, expected: list[tuple[str, str, str]]) -> None:
    """expected: per entry (device_id, status, kcv or problem code)."""
    assert len(result.entries) == len(expected), result
    for e, (device, status, what) in zip(result.entries, expected):
        assert e.status == status, e
        if device:
            assert e.device_id == device, e
        if status == "ACCEPTED":
            assert e.problems == () and e.kcv == what, e
        else:
            assert what in codes(e) and e.kcv == "", e


def count_rows(app, table) -> int:
    with app.store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def master_rows(app) -> dict[str, object]:
    with app.store.engine.connect() as conn:
        return {r.device_id: r for r in conn.execute(select(st.master_keys))}


def dco_objects(app) -> list[tuple[str, bool]]:
    """(label, is-token-object) of every object the DCO token shows this process."""
    with app.partitions.dco.session() as s:
        return sorted((str(o[Attribute.LABEL] or ""), bool(o[Attribute.TOKEN]))
                      for o in s.raw.get_objects())


def rfc3394_wrap(kek: bytes, data: bytes) -> bytes:
    """RFC 3394 for any n >= 1 (pyca refuses fewer than 16 bytes: an 8-byte 'key')."""
    def aes(block: bytes) -> bytes:
        e = Cipher(algorithms.AES(kek), modes.ECB()).encryptor()
        return e.update(block) + e.finalize()
    a = bytes.fromhex("A6A6A6A6A6A6A6A6")
    r = [data[i:i + 8] for i in range(0, len(data), 8)]
    n = len(r)
    for j in range(6):
        for i in range(n):
            b = aes(a + r[i])
            t = (n * j + i + 1).to_bytes(8, "big")
            a = bytes(x ^ y for x, y in zip(b[:8], t))
            r[i] = b[8:]
    return a + b"".join(r)


def run_both(app, xml: bytes):
    """ValidateMasterKeys then UnwrapMasterKeys: the two must agree entry for entry."""
    v = dco.process_master_keys(app, DCO, xml, store=False)
    u = dco.process_master_keys(app, DCO, xml, store=True)
    assert v == u
    return u


# --------------------------------------------------------------------------- examples
def _example_with_own_key_name(app, name: str) -> tuple[bytes, dict]:
    """The example's file with its DCO KeyName renamed to a unique key holding the example's
    transport key (the example's fixed names can enter the session's token only once)."""
    d, expect = EXAMPLES / name, _expect(name)
    key_name = unique("DCO-EX")
    if expect["transport"] == "kw":
        load_aes(app, key_name, bytes.fromhex(expect["dco_transport_key"]["hex"]),
                 owner_id=expect["originator_id"])
    else:
        private = serialization.load_pem_private_key((d / "dco_rsa.pem").read_bytes(), None)
        load_rsa(app, key_name, private, expect["originator_id"])
    xml = enc.set_text((d / "file.xml").read_bytes(), DCO_KEY_NAME_PATH, key_name, index=None)
    return xml, expect


@pytest.mark.parametrize("name", EXAMPLE_DIRS)
def test_examples_unwrap_to_master_keys_with_the_expected_kcvs_in_process(app, name):
    xml, expect = _example_with_own_key_name(app, name)
    r = dco.process_master_keys(app, DCO, xml, store=True)
    assert r.migration_file_id == expect["file_id"] and r.group_id == expect["group"]
    got = {e.device_id: (e.chf_identifier, e.status, e.kcv, e.problems) for e in r.entries}
    assert got == {dev: (mk["chf"], "ACCEPTED", mk["kcv_cmac"], ())
                   for dev, mk in expect["master_keys"].items()}
    rows = master_rows(app)
    assert {d: (r.kcv, r.chf_identifier, r.file_id) for d, r in rows.items()} == {
        dev: (mk["kcv_cmac"], mk["chf"], expect["file_id"])
        for dev, mk in expect["master_keys"].items()}
    for dev, mk in expect["master_keys"].items():
        assert dco.verify_master_key(app, dev, mk["kcv_cmac"], "CMAC")
        assert dco.verify_master_key(app, dev, mk["kcv_ecb"], "ECB")
        assert dco.verify_master_key(app, dev.lower().replace("-", ""), mk["kcv_cmac"].lower())
        assert not dco.verify_master_key(app, dev, mk["kcv_ecb"], "CMAC")
        assert not dco.verify_master_key(app, dev, mk["kcv_cmac"], "ECB")
        assert not dco.verify_master_key(app, dev, "0000000000", "CMAC")
        for not_a_kcv in ("", "ZZZZZZ", "ÄÖÜ123"):
            with pytest.raises(KeysvcError) as info:
                dco.verify_master_key(app, dev, not_a_kcv, "CMAC")
            assert info.value.code == "INVALID_REQUEST"


def test_verify_master_key_for_an_unknown_device_is_device_key_not_found(app):
    with pytest.raises(KeysvcError) as ei:
        dco.verify_master_key(app, "10-00-00-00-00-00-00-01", "0000000000")
    assert ei.value.code == "DEVICE_KEY_NOT_FOUND"
    with pytest.raises(KeysvcError) as ei:
        dco.verify_master_key(app, "not-an-eui64", "0000000000")
    assert ei.value.code == "INVALID_EUI64"


@pytest.fixture(scope="module")
def dco_server(tmp_path_factory):
    """This module's own server, holding the examples' transport keys by their own names."""
    from tests.serverproc import start_server
    state = tmp_path_factory.mktemp("dco-server")
    srv = start_server(state)
    for name in EXAMPLE_DIRS:
        srv.load_example_keys(EXAMPLES / name, _expect(name))
    # Server.load_rsa_key writes the eb-oaep keys into the token from another process; a
    # running SoftHSM2 stops seeing them once it writes to that token itself (its object
    # index only rescans when the token's generation moved behind its back). A restart
    # makes the server read the token afresh.
    srv.stop()
    srv = start_server(state)
    yield srv
    srv.stop()


@pytest.mark.parametrize("name", EXAMPLE_DIRS)
def test_examples_unwrap_to_master_keys_with_the_expected_kcvs_through_the_server(
        dco_server, name):
    expect = _expect(name)
    data = (EXAMPLES / name / "file.xml").read_bytes()
    stub = dco_server.as_("dco").dco
    v = stub.ValidateMasterKeys(pb.ValidateMasterKeysRequest(file=data))
    r = stub.UnwrapMasterKeys(pb.UnwrapMasterKeysRequest(file=data))
    for res in (v, r):
        assert res.migration_file_id == expect["file_id"] and res.group_id == expect["group"]
        assert res.accepted_count == len(expect["master_keys"]) and res.rejected_count == 0
        assert {e.device_id: (e.chf_identifier, e.status, e.kcv) for e in res.entries} == {
            dev: (mk["chf"], pb.ACCEPTED, mk["kcv_cmac"])
            for dev, mk in expect["master_keys"].items()}
    for dev, mk in expect["master_keys"].items():
        for kcv, method, match in ((mk["kcv_cmac"], pb.CMAC, True),
                                   (mk["kcv_ecb"], pb.ECB, True),
                                   (mk["kcv_ecb"], pb.CMAC, False),
                                   (mk["kcv_cmac"], pb.ECB, False),
                                   ("FFFFFFFFFF", pb.CMAC, False)):
            assert stub.VerifyMasterKey(pb.VerifyMasterKeyRequest(
                device_id=dev, expected_kcv=kcv, kcv_method=method)).match is match


def test_verify_master_key_through_the_server_for_an_unknown_device_is_not_found(dco_server):
    with pytest.raises(grpc.RpcError) as ei:
        dco_server.as_("dco").dco.VerifyMasterKey(pb.VerifyMasterKeyRequest(
            device_id="10-00-00-00-00-00-00-02", expected_kcv="0000000000"))
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(ei.value) == "DEVICE_KEY_NOT_FOUND"


def test_file_level_errors_through_the_server_carry_status_and_reason(dco_server):
    m = Made(None, 2, load=False)  # names a key the server does not have
    stub = dco_server.as_("dco").dco
    for call, req in ((stub.ValidateMasterKeys, pb.ValidateMasterKeysRequest),
                      (stub.UnwrapMasterKeys, pb.UnwrapMasterKeysRequest)):
        with pytest.raises(grpc.RpcError) as ei:
            call(req(file=m.xml))
        assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(ei.value) == "UNKNOWN_TRANSPORT_KEY"


# --------------------------------------------------------------------------- group information
def _replace_group_information(xml: bytes, build) -> bytes:
    root = etree.fromstring(xml)
    info = root.find("m:EncryptedS1SPGroupInformation", enc.NSMAP)
    for child in list(info):
        info.remove(child)
    build(info)
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


def _junk_elements(info) -> None:
    etree.SubElement(info, f"{{{enc.NS}}}NotEncryptedData").text = "garbage"
    junk = etree.SubElement(info, "{urn:example:junk}Junk", Algorithm="urn:nonsense")
    etree.SubElement(junk, f"{{{enc.XENC_NS}}}CipherValue").text = "!!! not base64 !!!"
    etree.SubElement(info, f"{{{enc.XENC_NS}}}EncryptedKey")


def _text_only(info) -> None:
    info.text = "this is not encrypted data <at all> & not base64 ==="


def _two_broken_encrypted_data(info) -> None:
    for _ in range(2):
        ed = etree.SubElement(info, f"{{{enc.XENC_NS}}}EncryptedData", Type="bogus")
        etree.SubElement(ed, f"{{{enc.XENC_NS}}}EncryptionMethod", Algorithm="urn:x:rot13")
        etree.SubElement(etree.SubElement(ed, f"{{{enc.XENC_NS}}}CipherData"),
                         f"{{{enc.XENC_NS}}}CipherValue").text = "%%%"


def _empty(info) -> None:
    pass


@pytest.mark.parametrize("garbage", [_junk_elements, _text_only, _two_broken_encrypted_data,
                                     _empty], ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("rsa_kek", [False, True], ids=["kw", "oaep"])
def test_dco_path_never_touches_encrypted_s1sp_group_information(app, garbage, rsa_kek):
    m = Made(app, 3, rsa_kek=rsa_kek)
    xml = _replace_group_information(m.xml, garbage)
    assert b"EncryptedData Type=\"http" not in xml
    r = run_both(app, xml)
    assert_entries(r, [(i.esme, "ACCEPTED", k) for i, k in zip(m.insts, m.kcvs())])
    assert len(master_rows(app)) == 3


# --------------------------------------------------------------------------- per entry
BAD_EUI64 = ["", "00-11-22-33-44-55-66", "00-11-22-33-44-55-66-77-88", "00-11-22-33-44-55-66-GG",
             "00:11:22:33:44:55:66:77", "0011-2233-4455-6677", "not an identifier",
             "x" * 64]


@pytest.mark.parametrize("bad", BAD_EUI64)
@pytest.mark.parametrize("element", ["CHFIdentifier", "DeviceID"])
def test_malformed_chf_identifier_or_device_id_is_invalid_eui64_and_others_accepted(
        app, element, bad):
    m = Made(app, 4)
    xml = enc.set_text(m.xml, f"//m:MasterKeyEntry/m:{element}", bad, index=2)
    r = run_both(app, xml)
    expected = [(i.esme, "ACCEPTED", k) for i, k in zip(m.insts, m.kcvs())]
    expected[2] = ("" if element == "DeviceID" else m.insts[2].esme, "REJECTED", "INVALID_EUI64")
    assert_entries(r, expected)
    assert [p.field for p in r.entries[2].problems] == [element]
    assert sorted(master_rows(app)) == sorted(i.esme for j, i in enumerate(m.insts) if j != 2)


def test_identifiers_in_lower_case_or_without_separators_are_normalised(app):
    m = Made(app, 2)
    xml = enc.set_text(m.xml, "//m:MasterKeyEntry/m:CHFIdentifier",
                       m.insts[0].chf.lower(), index=0)
    xml = enc.set_text(xml, "//m:MasterKeyEntry/m:DeviceID",
                       m.insts[1].esme.replace("-", "").lower(), index=1)
    r = run_both(app, xml)
    assert [(e.chf_identifier, e.device_id) for e in r.entries] == [
        (i.chf, i.esme) for i in m.insts]
    assert_entries(r, [(i.esme, "ACCEPTED", k) for i, k in zip(m.insts, m.kcvs())])


def _dup_whole_entry(m: Made) -> tuple[bytes, set[int]]:
    return enc.duplicate(m.xml, "//m:MasterKeyEntry", index=1), {1, 2}


def _dup_chf(m: Made) -> tuple[bytes, set[int]]:
    return enc.set_text(m.xml, "//m:MasterKeyEntry/m:CHFIdentifier", m.insts[0].chf,
                        index=3), {0, 3}


def _dup_device_in_other_spelling(m: Made) -> tuple[bytes, set[int]]:
    return enc.set_text(m.xml, "//m:MasterKeyEntry/m:DeviceID",
                        m.insts[1].esme.replace("-", "").lower(), index=2), {1, 2}


@pytest.mark.parametrize("make", [_dup_whole_entry, _dup_chf, _dup_device_in_other_spelling],
                         ids=lambda f: f.__name__.strip("_"))
def test_duplicate_entries_are_duplicate_identifier_and_others_accepted(app, make):
    m = Made(app, 4)
    xml, dups = make(m)
    r = run_both(app, xml)
    for i, e in enumerate(r.entries):
        if i in dups:
            assert e.status == "REJECTED" and "DUPLICATE_IDENTIFIER" in codes(e) and not e.kcv, e
        else:
            assert e.status == "ACCEPTED" and e.problems == () and e.kcv, e
    accepted = {e.device_id: e.kcv for e in r.entries if e.status == "ACCEPTED"}
    assert accepted == {i.esme: enc.kcv(i.master_key) for i in m.insts
                        if i.esme in accepted}
    assert len(accepted) == len(r.entries) - len(dups)
    assert sorted(master_rows(app)) == sorted(accepted)


def test_a_device_already_stored_from_another_file_is_duplicate_identifier(app):
    m = Made(app, 3)
    run_both(app, m.xml)
    again = enc.set_text(m.xml, "//m:MigrationFileID", unique("MGEF-OTHER"))
    r = dco.process_master_keys(app, DCO, again, store=True)
    assert all(e.status == "REJECTED" and codes(e) == ["DUPLICATE_IDENTIFIER"]
               for e in r.entries)
    assert len(master_rows(app)) == 3 and count_rows(app, st.migration_files) == 2


def test_validating_gives_the_verdict_unwrapping_would_for_a_device_already_stored(app):
    m = Made(app, 3)
    dco.process_master_keys(app, DCO, m.xml, store=True)
    other = enc.set_text(m.xml, "//m:MigrationFileID", unique("MGEF-OTHER"))
    validated = dco.process_master_keys(app, DCO, other, store=False)
    assert all(codes(e) == ["DUPLICATE_IDENTIFIER"] for e in validated.entries)
    assert validated == dco.process_master_keys(app, DCO, other, store=True)
    # the file that stored them validates as good as it was
    assert all(e.status == "ACCEPTED"
               for e in dco.process_master_keys(app, DCO, m.xml, store=False).entries)


def _bad_entry_cases():
    # (id, function(made, kek-kind) -> new CipherValue text)
    def other_kek(m: Made) -> str:
        other = rsa_key(1) if not isinstance(m.kek, bytes) else os.urandom(32)
        return m.wrapped_entry(m.insts[1].master_key, other)

    def flipped(m: Made) -> str:
        raw = bytearray(base64.b64decode(m.wrapped_entry(m.insts[1].master_key)))
        raw[len(raw) // 2] ^= 0x01
        return base64.b64encode(bytes(raw)).decode()

    def truncated(m: Made) -> str:
        raw = base64.b64decode(m.wrapped_entry(m.insts[1].master_key))
        return base64.b64encode(raw[:-8] if isinstance(m.kek, bytes) else raw[:-1]).decode()

    def not_block_multiple(m: Made) -> str:
        raw = base64.b64decode(m.wrapped_entry(m.insts[1].master_key))
        return base64.b64encode(raw + b"\x00\x01\x02").decode()

    def length(n: int):
        def wrap(m: Made) -> str:
            key = os.urandom(n)
            if isinstance(m.kek, bytes) and n < 16:
                return base64.b64encode(rfc3394_wrap(m.kek, key)).decode()
            return m.wrapped_entry(key)
        wrap.__name__ = f"{n}_byte_key"
        return wrap

    both = [other_kek, flipped, truncated, not_block_multiple, length(8), length(24),
            length(40)]
    return ([pytest.param(f, rsa, id=f"{f.__name__}-{'oaep' if rsa else 'kw'}")
             for f in both for rsa in (False, True)]
            # only OAEP can carry a key that is not a whole number of 64-bit blocks
            + [pytest.param(length(n), True, id=f"{n}_byte_key-oaep") for n in (1, 15, 17, 31)])


@pytest.mark.parametrize("bad, rsa_kek", _bad_entry_cases())
def test_entry_that_does_not_unwrap_to_a_128_or_256_bit_key_is_key_unwrap_failed(
        app, bad, rsa_kek):
    m = Made(app, 3, rsa_kek=rsa_kek)
    xml = enc.set_text(m.xml, CIPHER_VALUE_PATH, bad(m), index=1)
    r = run_both(app, xml)
    assert_entries(r, [(m.insts[0].esme, "ACCEPTED", m.kcvs()[0]),
                       (m.insts[1].esme, "REJECTED", "KEY_UNWRAP_FAILED"),
                       (m.insts[2].esme, "ACCEPTED", m.kcvs()[2])])
    assert codes(r.entries[1]) == ["KEY_UNWRAP_FAILED"]
    assert sorted(master_rows(app)) == sorted([m.insts[0].esme, m.insts[2].esme])


@pytest.mark.parametrize("rsa_kek", [False, True], ids=["kw", "oaep"])
def test_a_256_bit_master_key_is_accepted(app, rsa_kek):
    m = Made(app, 2, rsa_kek=rsa_kek)
    key = os.urandom(32)
    xml = enc.set_text(m.xml, CIPHER_VALUE_PATH, m.wrapped_entry(key), index=0)
    r = run_both(app, xml)
    assert_entries(r, [(m.insts[0].esme, "ACCEPTED", enc.kcv(key)),
                       (m.insts[1].esme, "ACCEPTED", m.kcvs()[1])])
    assert dco.verify_master_key(app, m.insts[0].esme, enc.kcv(key, "ECB"), "ECB")
    assert len(master_rows(app)[m.insts[0].esme].wrapped) == 40


# --------------------------------------------------------------------------- storing
def test_validate_master_keys_stores_nothing(app):
    m = Made(app, 3)
    before = dco_objects(app)
    r = dco.process_master_keys(app, DCO, m.xml, store=False)
    assert_entries(r, [(i.esme, "ACCEPTED", k) for i, k in zip(m.insts, m.kcvs())])
    assert count_rows(app, st.master_keys) == 0
    assert count_rows(app, st.migration_files) == 0
    assert dco_objects(app) == before
    with pytest.raises(KeysvcError) as ei:
        dco.verify_master_key(app, m.insts[0].esme, m.kcvs()[0])
    assert ei.value.code == "DEVICE_KEY_NOT_FOUND"
    # validating does not use up the MigrationFileID either
    assert dco.process_master_keys(app, DCO, m.xml, store=True) == r


def test_unwrap_master_keys_is_idempotent_per_migration_file_id(app):
    m = Made(app, 3)
    first = dco.process_master_keys(app, DCO, m.xml, store=True)
    rows = {d: (r.wrapped, r.kcv) for d, r in master_rows(app).items()}
    again = dco.process_master_keys(app, DCO, m.xml, store=True)
    assert again == first
    assert all(e.status == "ACCEPTED" for e in again.entries)  # not "already stored"
    assert {d: (r.wrapped, r.kcv) for d, r in master_rows(app).items()} == rows
    assert count_rows(app, st.master_keys) == 3 and count_rows(app, st.migration_files) == 1

    other_bytes = enc.set_text(m.xml, "//m:CreationDateTime", "2021-01-01T00:00:00Z")
    with pytest.raises(KeysvcError) as ei:
        dco.process_master_keys(app, DCO, other_bytes, store=True)
    assert ei.value.code == "FILE_ALREADY_PROCESSED"
    # even a file whose only difference is its DCO view's irrelevant part is other bytes
    other_info = _replace_group_information(m.xml, _text_only)
    with pytest.raises(KeysvcError) as ei:
        dco.process_master_keys(app, DCO, other_info, store=True)
    assert ei.value.code == "FILE_ALREADY_PROCESSED"
    assert count_rows(app, st.master_keys) == 3 and count_rows(app, st.migration_files) == 1
    assert dco.process_master_keys(app, DCO, m.xml, store=True) == first


def test_unwrap_master_keys_through_the_server_is_idempotent(dco_server):
    m = Made(None, 2, load=False)
    dco_server.import_aes_key(m.key_name, m.kek, purpose="DCO_TRANSPORT", owner_id=ORIGINATOR)
    stub = dco_server.as_("dco").dco
    first = stub.UnwrapMasterKeys(pb.UnwrapMasterKeysRequest(file=m.xml))
    assert first.accepted_count == 2
    assert stub.UnwrapMasterKeys(pb.UnwrapMasterKeysRequest(file=m.xml)) == first
    with pytest.raises(grpc.RpcError) as ei:
        stub.UnwrapMasterKeys(pb.UnwrapMasterKeysRequest(
            file=enc.set_text(m.xml, "//m:CreationDateTime", "2021-01-01T00:00:00Z")))
    assert ei.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(ei.value) == "FILE_ALREADY_PROCESSED"


def test_master_keys_are_stored_wrapped_and_leave_no_token_object(app):
    m = Made(app, 6)
    before = dco_objects(app)
    r = dco.process_master_keys(app, DCO, m.xml, store=True)
    assert r.accepted_count == 6
    rows = master_rows(app)
    assert sorted(rows) == sorted(i.esme for i in m.insts)
    file_wrapped = set(base64.b64decode(t) for t in
                       etree.fromstring(m.xml).xpath(CIPHER_VALUE_PATH + "/text()",
                                                     namespaces=enc.NSMAP))
    for inst in m.insts:
        row = rows[inst.esme]
        key = inst.master_key
        w = bytes(row.wrapped)
        assert len(w) == len(key) + 8           # RFC 3394 under the DCO storage key
        for form in (key, key.hex().encode(), key.hex().upper().encode()):
            assert form not in w
        for column in row._mapping.values():
            text = column if isinstance(column, str) else ""
            assert key.hex().upper() not in text.upper()
        assert w not in file_wrapped            # re-wrapped, not the transport form kept
        assert w != aes_key_wrap(m.kek, key)
        assert row.kcv == enc.kcv(key)
    after = dco_objects(app)
    assert after == before, "token or session objects were left behind"
    labels = " ".join(label for label, _ in after).upper()
    for inst in m.insts:
        for ident in (inst.esme, inst.chf):
            assert ident not in labels and ident.replace("-", "") not in labels
    # VerifyMasterKey unwraps a session copy: it too leaves nothing behind
    for inst in m.insts:
        assert dco.verify_master_key(app, inst.esme, enc.kcv(inst.master_key))
    assert dco_objects(app) == before


# --------------------------------------------------------------------------- file level
def _expect_file_error(app, xml: bytes, code: str) -> None:
    for store in (False, True):
        with pytest.raises(KeysvcError) as ei:
            dco.process_master_keys(app, DCO, xml, store=store)
        assert ei.value.code == code, ei.value
    assert count_rows(app, st.master_keys) == 0
    assert count_rows(app, st.migration_files) == 0


@pytest.mark.parametrize("group", ["EA", "AA", "BA", "CA", "CB"])
def test_requesting_party_may_not_originate_this_group_originator_not_permitted(app, group):
    m = Made(app, 2, group=group, originator_type="RequestingParty")
    _expect_file_error(app, m.xml, "ORIGINATOR_NOT_PERMITTED")


@pytest.mark.parametrize("group", ["EB", "EC"])
def test_requesting_party_may_originate_eb_and_ec(app, group):
    m = Made(app, 2, group=group, originator_type="RequestingParty")
    assert_entries(run_both(app, m.xml),
                   [(i.esme, "ACCEPTED", k) for i, k in zip(m.insts, m.kcvs())])


def test_an_ea_file_claiming_smso_under_a_requesting_partys_key_is_originator_not_permitted(app):
    """The header's OriginatorType is a claim; the key's owner is what the ceremony set."""
    m = Made(app, 2, load=False)
    load_aes(app, m.key_name, m.kek, owner_type="REQUESTING_PARTY")
    _expect_file_error(app, m.xml, "ORIGINATOR_NOT_PERMITTED")


def test_every_entrys_algorithm_is_checked_not_only_the_first_per_key_name(app):
    m = Made(app, 2)
    bad = enc.set_attribute(m.xml, "//m:MasterKeyEntry/xenc:EncryptedKey/xenc:EncryptionMethod",
                            "Algorithm", "urn:bogus", index=0)
    _expect_file_error(app, bad, "UNSUPPORTED_ALGORITHM")


def test_a_dco_key_not_shared_with_the_originator_is_originator_not_permitted(app):
    m = Made(app, 2, load=False)
    load_aes(app, m.key_name, m.kek, owner_id="SMSO-SOMEONE-ELSE")
    _expect_file_error(app, m.xml, "ORIGINATOR_NOT_PERMITTED")


def test_an_unknown_dco_key_is_unknown_transport_key(app):
    m = Made(app, 2, load=False)
    _expect_file_error(app, m.xml, "UNKNOWN_TRANSPORT_KEY")


@pytest.mark.parametrize("purpose", ["S1SP_TRANSPORT", "EXPORT"])
def test_naming_a_key_of_another_purpose_is_wrong_key_purpose(app, purpose):
    m = Made(app, 2, load=False)
    load_aes(app, m.key_name, m.kek, purpose=purpose)
    _expect_file_error(app, m.xml, "WRONG_KEY_PURPOSE")


def test_naming_an_s1sp_rsa_recipient_key_is_wrong_key_purpose(app):
    m = Made(app, 2, rsa_kek=True, load=False)
    keyadmin.register_existing_rsa_key(app, name=m.key_name, purpose="S1SP_TRANSPORT",
                                       allowed_originators=[ORIGINATOR], private_key=m.kek)
    _expect_file_error(app, m.xml, "WRONG_KEY_PURPOSE")


def test_one_bad_key_name_among_entries_fails_the_whole_file(app):
    m = Made(app, 3)
    xml = enc.set_text(m.xml, DCO_KEY_NAME_PATH, unique("DCO-MISSING"), index=2)
    _expect_file_error(app, xml, "UNKNOWN_TRANSPORT_KEY")


# --------------------------------------------------------------------------- CLI
def _cli(srv, *args: str) -> subprocess.CompletedProcess:
    keysvc = Path(sys.executable).with_name("keysvc")
    cmd = [str(keysvc)] if keysvc.exists() else [sys.executable, "-m", "keysvc.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYSVC_")}
    return subprocess.run([*cmd, *args, "--state-dir", str(srv.state_dir),
                           "--server", srv.target], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=60)


def test_cli_dco_validate_directory_prints_a_summary_table(dco_server, tmp_path):
    d = tmp_path / "files"
    d.mkdir()
    for name in EXAMPLE_DIRS:
        shutil.copy(EXAMPLES / name / "file.xml", d / f"{name}.xml")
    out = _cli(dco_server, "dco", "validate", str(d))
    assert out.returncode == 0, out.stderr + out.stdout
    assert "master keys" in out.stdout
    total = 0
    for name in EXAMPLE_DIRS:
        for dev, mk in _expect(name)["master_keys"].items():
            line = next(ln for ln in out.stdout.splitlines() if dev in ln)
            assert f"{name}.xml" in line and mk["chf"] in line
            assert "ACCEPTED" in line and mk["kcv_cmac"] in line
            total += 1
    assert f"3 file(s): {total} accepted, 0 rejected, 0 file(s) refused" in out.stdout


def test_cli_dco_unwrap_file_prints_a_summary_table(dco_server, tmp_path):
    m = Made(None, 3, load=False)
    dco_server.import_aes_key(m.key_name, m.kek, purpose="DCO_TRANSPORT", owner_id=ORIGINATOR)
    xml = enc.set_text(m.xml, "//m:MasterKeyEntry/m:DeviceID", "bogus", index=1)
    f = tmp_path / "one.xml"
    f.write_bytes(xml)
    out = _cli(dco_server, "dco", "unwrap", str(f))
    assert out.returncode == 0, out.stderr + out.stdout
    for i in (0, 2):
        line = next(ln for ln in out.stdout.splitlines() if m.insts[i].esme in ln)
        assert "ACCEPTED" in line and enc.kcv(m.insts[i].master_key) in line
    line = next(ln for ln in out.stdout.splitlines() if m.insts[1].chf in ln)
    assert "REJECTED" in line and "INVALID_EUI64" in line
    assert "1 file(s): 2 accepted, 1 rejected, 0 file(s) refused" in out.stdout
    # the keys are stored: the DCO can check them by KCV
    stub = dco_server.as_("dco").dco
    assert stub.VerifyMasterKey(pb.VerifyMasterKeyRequest(
        device_id=m.insts[0].esme, expected_kcv=enc.kcv(m.insts[0].master_key))).match
    # a file the server refuses is reported as such, with a failing exit status
    bad = tmp_path / "bad.xml"
    bad.write_bytes(Made(None, 1, load=False).xml)
    out = _cli(dco_server, "dco", "unwrap", str(bad))
    assert out.returncode == 1
    assert "FILE REJECTED" in out.stdout and "UNKNOWN_TRANSPORT_KEY" in out.stdout
    assert "1 file(s): 0 accepted, 1 rejected, 1 file(s) refused" in out.stdout
