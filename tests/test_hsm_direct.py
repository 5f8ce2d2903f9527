"""The hot loops' direct PKCS#11 calls (keysvc/hsm/direct.py) against the real SoftHSM2 token.

Every key is checked with an outside witness: pyca/cryptography computes the same check
value, key wrap and unwrap in software from the known bits. A session that dies under one
of these calls is tested with the other keysvc.hsm.keys calls in test_hsm.py.
"""
from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

import pkcs11
import pytest
from cryptography.hazmat.primitives.keywrap import (
    aes_key_unwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap,
    aes_key_wrap_with_padding,
)
from pkcs11 import Attribute as A
from pkcs11 import KeyType, ObjectClass

from keysvc.hsm import HsmOperationFailed, HsmUnavailable, direct
from keysvc.hsm import keys as hk
from keysvc.hsm.errors import BROKEN_SESSION
from tests.support.encoder import kcv
from tests.test_hsm import EXAMPLE_KEYS

KNOWN_STORAGE_USAGE = hk.STORAGE_USAGE  # a session wrapping key whose bits the test knows


def _session_object(s, key: hk.SessionKey):
    """python-pkcs11's view of the same object, to read its attributes."""
    for obj in s.raw.get_objects({A.CLASS: ObjectClass.SECRET_KEY, A.TOKEN: False}):
        if obj.handle == key.handle:
            return obj
    raise AssertionError("the session key is not in its session")


def test_a_key_made_in_the_loop_has_the_check_value_pyca_computes_for_its_bits(app):
    with app.partitions.s1sp.session() as s:
        s.retire_after_use()
        for example, label, entry in EXAMPLE_KEYS:
            value = bytes.fromhex(entry["hex"])
            key = hk.create_session_key(s, value, hk.PLAINTEXT_KEY_USAGE)
            assert hk.check_value(key) == kcv(value, "CMAC"), (example, label)


@pytest.mark.parametrize("pad", [False, True], ids=["rfc3394", "rfc5649"])
def test_a_key_made_in_the_loop_wraps_to_what_pyca_unwraps_to_its_bits(app, pad):
    storage_bits = os.urandom(32)
    with app.partitions.s1sp.session() as s:
        s.retire_after_use()
        storage = hk.create_aes(s, storage_bits, usage=KNOWN_STORAGE_USAGE)
        for size in (16, 24, 32):
            value = os.urandom(size)
            wrapped = hk.wrap(storage, hk.create_session_key(s, value, hk.PLAINTEXT_KEY_USAGE),
                              pad=pad)
            unwrap = aes_key_unwrap_with_padding if pad else aes_key_unwrap
            assert unwrap(storage_bits, wrapped) == value


@pytest.mark.parametrize("how", [hk.Unwrap.AES_KW, hk.Unwrap.AES_KW_PAD], ids=["kw", "kwp"])
def test_a_key_unwrapped_in_the_loop_is_the_key_that_pyca_wrapped(app, how):
    kek_bits, value = os.urandom(32), os.urandom(16)
    wrapped = (aes_key_wrap if how is hk.Unwrap.AES_KW else aes_key_wrap_with_padding)(
        kek_bits, value)
    with app.partitions.s1sp.session() as s:
        s.retire_after_use()
        kek = hk.create_aes(s, kek_bits, usage=hk.KEK_USAGE)
        key = hk.unwrap_session_key(s, kek, wrapped, how, hk.DEVICE_USAGE)
        assert hk.check_value(key) == kcv(value, "CMAC")


def test_a_key_made_in_the_loop_carries_exactly_its_usage(app):
    with app.partitions.s1sp.session() as s:
        s.retire_after_use()
        obj = _session_object(s, hk.create_session_key(s, os.urandom(16),
                                                       hk.PLAINTEXT_KEY_USAGE))
        assert obj[A.SENSITIVE] is True and obj[A.TOKEN] is False
        assert obj[A.EXTRACTABLE] is True  # so that the storage key can wrap it
        assert obj[A.PRIVATE] is False  # its bits are in this process already
        assert (obj[A.SIGN], obj[A.ENCRYPT]) == (True, True)  # check values only
        assert (obj[A.WRAP], obj[A.UNWRAP], obj[A.DECRYPT], obj[A.VERIFY], obj[A.DERIVE]) == \
            (False, False, False, False, False)


SECRET_ATTRIBUTES = (A.CLASS, A.KEY_TYPE, A.TOKEN, A.PRIVATE, A.SENSITIVE, A.EXTRACTABLE,
                     A.ENCRYPT, A.DECRYPT, A.SIGN, A.VERIFY, A.WRAP, A.UNWRAP, A.DERIVE,
                     A.VALUE_LEN)


@pytest.mark.parametrize("usage", ["PLAINTEXT_KEY_USAGE", "DEVICE_USAGE", "KCV_USAGE"])
def test_a_key_made_in_the_loop_has_the_attributes_python_pkcs11_would_give_it(app, usage):
    with app.partitions.s1sp.session() as s:
        s.retire_after_use()
        value = os.urandom(16)
        ours = _session_object(s, hk.create_session_key(s, value, getattr(hk, usage)))
        theirs = hk.create_aes(s, value, usage=getattr(hk, usage))
        assert ours.get_attributes(list(SECRET_ATTRIBUTES)) == \
            theirs.get_attributes(list(SECRET_ATTRIBUTES))


def test_a_master_key_unwrapped_in_the_loop_is_private_and_sensitive(app):
    kek_bits = os.urandom(32)
    with app.partitions.dco.session() as s:
        s.retire_after_use()
        kek = hk.create_aes(s, kek_bits, usage=hk.KEK_USAGE)
        key = hk.unwrap_session_key(s, kek, aes_key_wrap(kek_bits, os.urandom(16)),
                                    hk.Unwrap.AES_KW, hk.DEVICE_USAGE)
        obj = _session_object(s, key)
        assert (obj[A.PRIVATE], obj[A.SENSITIVE], obj[A.TOKEN]) == (True, True, False)
        with pytest.raises(Exception):
            obj[A.VALUE]  # never readable out of the token


def test_an_unwrap_that_fails_its_integrity_check_is_an_operation_failure_without_data(app):
    kek_bits = os.urandom(32)
    tampered = bytearray(aes_key_wrap(kek_bits, os.urandom(16)))
    tampered[3] ^= 1
    with app.partitions.s1sp.session() as s:
        s.retire_after_use()
        kek = hk.create_aes(s, kek_bits, usage=hk.KEK_USAGE)
        with pytest.raises(HsmOperationFailed) as caught:
            hk.unwrap_session_key(s, kek, bytes(tampered), hk.Unwrap.AES_KW, hk.DEVICE_USAGE)
    assert str(caught.value).startswith("mechanism failed (CKR 0x")
    assert bytes(tampered).hex() not in str(caught.value).lower()


def test_a_key_whose_usage_forbids_the_mechanism_is_refused_by_the_token(app):
    with app.partitions.s1sp.session() as s:
        s.retire_after_use()
        storage = hk.create_aes(s, os.urandom(32), usage=KNOWN_STORAGE_USAGE)
        key = hk.create_session_key(s, os.urandom(16), hk.PLAINTEXT_KEY_USAGE)
        wrapped = hk.wrap(storage, key)
        # A storage key may not sign; made in the loop, it is refused by the token, too.
        storage_as_loop_key = hk.unwrap_session_key(s, storage, wrapped, hk.Unwrap.AES_KW,
                                                    hk.STORAGE_USAGE)
        with pytest.raises(HsmOperationFailed):
            hk.check_value(storage_as_loop_key)


def test_a_destroyed_loop_key_can_no_longer_be_used(app):
    with app.partitions.s1sp.session() as s:
        key = hk.create_session_key(s, os.urandom(16), hk.PLAINTEXT_KEY_USAGE)
        hk.destroy(key)
        with pytest.raises(HsmOperationFailed):
            hk.check_value(key)



def test_a_wrapping_longer_than_the_first_buffer_is_fetched_whole(app):
    """C_WrapKey told CKR_BUFFER_TOO_SMALL is called again with the length asked for."""
    storage_bits, value = os.urandom(32), os.urandom(200)
    with app.partitions.s1sp.session() as s:
        s.retire_after_use()
        storage = hk.create_aes(s, storage_bits, usage=KNOWN_STORAGE_USAGE)
        secret = s.raw.create_object({
            A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.GENERIC_SECRET, A.TOKEN: False,
            A.VALUE: value, A.SENSITIVE: True, A.EXTRACTABLE: True})
        wrapped = hk.wrap(storage, hk.SessionKey(s, secret.handle), pad=True)
    assert len(wrapped) == 208
    assert aes_key_unwrap_with_padding(storage_bits, wrapped) == value


def test_a_loop_that_outlives_a_re_read_of_the_token_stops(app, monkeypatch):
    """After C_Finalize + C_Initialize every handle the loop holds is void, and may name
    another session's objects: the loop must not go on with them."""
    token = app.partitions.s1sp
    monkeypatch.setattr("keysvc.hsm.token.time.sleep", lambda _: token.refresh())
    with pytest.raises(HsmUnavailable):
        with token.session() as s:
            token.breathe()  # another caller re-reads the token meanwhile
            hk.create_session_key(s, os.urandom(16), hk.PLAINTEXT_KEY_USAGE)
    monkeypatch.undo()
    with token.session() as s:  # the token itself is fine
        assert hk.check_value(hk.create_session_key(s, bytes(range(16)),
                                                    hk.PLAINTEXT_KEY_USAGE))


# --------------------------------------------------------------------------- the binding
def test_the_function_list_names_each_function_the_module_exports(app):
    """The layout, checked against the module itself: SoftHSM2 exports every C_ function."""
    lib = ctypes.CDLL(app.settings.pkcs11_module)
    fl = ctypes.POINTER(direct._CK_FUNCTION_LIST)()
    assert lib.C_GetFunctionList(ctypes.byref(fl)) == 0
    for name in direct._FUNCTIONS:
        exported = ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
        assert getattr(fl.contents, name) == exported, name


PKCS11_HEADER = Path("/usr/include/p11-kit-1/p11-kit/pkcs11.h")  # libp11-kit-dev


def test_the_broken_session_codes_are_the_pkcs11_headers_and_python_pkcs11s():
    header = {m[1]: int(m[2], 0) for m in re.finditer(
        r"#define\s+(CKR_\w+)\s+\(?(0x[0-9a-fA-F]+|\d+)UL", PKCS11_HEADER.read_text())}
    # python-pkcs11's own table: "elif rv == CKR_X:\n        exc = ClassName()"
    pxd = (Path(pkcs11.__file__).parent / "_pkcs11.pxd").read_text()
    ckr_of = {m[2]: m[1] for m in re.finditer(r"rv == (CKR_\w+):\s+exc = (\w+)\(\)", pxd)}
    for code, cls in direct._BROKEN.items():
        assert header[ckr_of[cls.__name__]] == code, cls.__name__
    # Every broken-session class python-pkcs11 maps from a return code is in the table.
    assert {c for c in BROKEN_SESSION if c.__name__ in ckr_of} == set(direct._BROKEN.values())
