"""The hsm package against the real SoftHSM2 token: mechanisms, check values, session pool."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pkcs11.exceptions as px
import pytest
from pkcs11 import Attribute

from keysvc.hsm import HsmUnavailable, Token, TokenConfig
from keysvc.hsm import keys as hk
from tests.conftest import EXAMPLES
from tests.support.encoder import kcv

# NIST SP 800-38B, Appendix D.1 (AES-128), D.2 (AES-192) and D.3 (AES-256).
NIST_MESSAGE = bytes.fromhex(
    "6bc1bee22e409f96e93d7e117393172a" "ae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52ef" "f69f2445df4f9b17ad2b417be66c3710")
NIST_CMAC = [
    ("2b7e151628aed2a6abf7158809cf4f3c", 0, "bb1d6929e95937287fa37d129b756746"),
    ("2b7e151628aed2a6abf7158809cf4f3c", 16, "070a16b46b4d4144f79bdd9dd04a287c"),
    ("2b7e151628aed2a6abf7158809cf4f3c", 40, "dfa66747de9ae63030ca32611497c827"),
    ("2b7e151628aed2a6abf7158809cf4f3c", 64, "51f0bebf7e3b9d92fc49741779363cfe"),
    ("8e73b0f7da0e6452c810f32b809079e562f8ead2522c6b7b", 0, "d17ddf46adaacde531cac483de7a9367"),
    ("8e73b0f7da0e6452c810f32b809079e562f8ead2522c6b7b", 64,
     "a1d5df0eed790f794d77589659f39a11"),
    ("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4", 0,
     "028962f61b7bf89efc6b551f4667d983"),
    ("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4", 16,
     "28a7023f452e8f82bd4bf28d8c37c35c"),
    ("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4", 40,
     "aaf3d8f1de5640c232f5b169b9c911e6"),
    ("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4", 64,
     "e1992190549f6ed5696a2c056c315410"),
]


@pytest.mark.parametrize("key_hex,length,expected", NIST_CMAC,
                         ids=[f"AES{len(k) * 4}-{n}B" for k, n, _ in NIST_CMAC])
def test_aes_cmac_computed_in_the_token_matches_nist_sp800_38b(app, key_hex, length, expected):
    with app.partitions.s1sp.session() as s:
        key = hk.create_aes(s, bytes.fromhex(key_hex), usage=hk.KCV_USAGE)
        try:
            assert hk.cmac(key, NIST_MESSAGE[:length]).hex() == expected
        finally:
            hk.destroy(key)


def _example_keys() -> list[tuple[str, str, dict]]:
    """(example, key label, entry) for every transport and device key in the examples."""
    out = []
    for expect_file in sorted(EXAMPLES.glob("*/expect.json")):
        expect = json.loads(expect_file.read_text())
        example = expect_file.parent.name
        for field in ("s1sp_transport_key", "dco_transport_key"):
            out.append((example, field, expect[field]))
        for inst in expect["installations"]:
            for label, entry in inst["keys"].items():
                out.append((example, label, entry))
    return out


EXAMPLE_KEYS = _example_keys()


@pytest.mark.parametrize("method", ["CMAC", "ECB"])
def test_token_kcv_equals_the_independent_pyca_kcv_for_every_example_key(app, method):
    assert {e for e, _, _ in EXAMPLE_KEYS} == {"aa-kw", "ea-kw", "eb-oaep"}
    with app.partitions.s1sp.session() as s:
        for example, label, entry in EXAMPLE_KEYS:
            value = bytes.fromhex(entry["hex"])
            key = hk.create_aes(s, value, usage=hk.KCV_USAGE)
            try:
                got = hk.check_value(key, hk.Kcv(method))
            finally:
                hk.destroy(key)
            assert got == kcv(value, method), (example, label)
            published = entry.get(f"kcv_{method.lower()}")
            if published:
                assert got == published, (example, label)


# --------------------------------------------------------------------------- session pool
def _token(app, **overrides) -> Token:
    """A second pool on the s1sp token. The app's own pool logs in first, so this one's
    sessions ride on that login and closing them never logs the process out."""
    with app.partitions.s1sp.session():
        pass
    s = app.settings
    return Token(TokenConfig(module=s.pkcs11_module, label=s.token_label("s1sp"),
                             pin=s.pin("s1sp"), **overrides))


def test_concurrent_borrowers_never_share_a_session(app):
    token = _token(app, pool_size=3, acquire_timeout=10)
    in_use: set[int] = set()
    seen: set[int] = set()
    clashes: list[int] = []
    lock = threading.Lock()

    def borrow_many() -> None:
        for _ in range(30):
            with token.session() as s:
                with lock:
                    if id(s) in in_use:
                        clashes.append(id(s))
                    in_use.add(id(s))
                    seen.add(id(s))
                hk.random_bytes(s, 16)
                time.sleep(0.001)
                with lock:
                    in_use.discard(id(s))

    threads = [threading.Thread(target=borrow_many) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        token.close()
    assert clashes == []
    assert len(seen) <= 3


def test_nested_borrowers_get_distinct_sessions(app):
    token = _token(app, pool_size=2)
    try:
        with token.session() as a, token.session() as b:
            assert a is not b and a.raw is not b.raw
    finally:
        token.close()


def _borrow_once(token: Token) -> tuple[type | None, float]:
    """(exception type or None, seconds waited) of one borrow."""
    started = time.monotonic()
    try:
        with token.session():
            return None, time.monotonic() - started
    except Exception as exc:
        return type(exc), time.monotonic() - started


@pytest.mark.parametrize("where", ["same thread", "other thread"])
def test_a_full_pool_makes_the_next_borrower_wait_acquire_timeout_then_hsm_unavailable(
        app, where):
    token = _token(app, pool_size=2, acquire_timeout=0.2)
    try:
        with token.session(), token.session():
            if where == "same thread":
                raised, waited = _borrow_once(token)
            else:
                with ThreadPoolExecutor(1) as pool:
                    raised, waited = pool.submit(_borrow_once, token).result()
        assert raised is HsmUnavailable
        # the configured 0.2 s, not the 5 s default (generous: the machine may be busy)
        assert 0.19 <= waited < 4.0
        assert _borrow_once(token)[0] is None  # returned sessions free their slots
    finally:
        token.close()


# The private tokens below share the module with the `app` fixture's tokens, so these tests
# stop at "not back in the pool": borrowing again would re-initialise the module under them.
def test_a_long_loops_breath_lets_a_waiting_caller_in(app):
    """A file's HSM loop holds the module lock between breaths; each breath lets a thread
    waiting for the lock in (the waiters are counted). A bare yield seldom did on a busy
    machine: the audit writer waited over 5 s behind a 30,000-installation file, failing
    small calls closed (the suite, session 18; tests/test_large_files.py catches that under
    load, this only the hand-over itself)."""
    token = app.partitions.s1sp
    served, breaths, done = [], [0], threading.Event()

    def caller() -> None:
        while not done.is_set() and len(served) < 20:
            with token.session():
                served.append(1)

    with token.session():  # the loop holds the lock, as a file's does
        other = threading.Thread(target=caller)
        other.start()
        while breaths[0] < 200 and len(served) < 20:
            sum(range(20_000))  # (a step of the loop, holding the GIL as Python does)
            token.breathe()
            breaths[0] += 1
        done.set()
    other.join(10)
    assert len(served) == 20, f"{len(served)} callers served in {breaths[0]} breaths"


def test_a_broken_session_is_not_returned_to_the_pool(app):
    token = _token(app, pool_size=2)
    try:
        with pytest.raises(HsmUnavailable):
            with token.session():
                raise px.SessionHandleInvalid()
        assert token.idle == 0
    finally:
        token.close()


MAC_AND_DECRYPT = {**hk.KCV_USAGE, Attribute.DECRYPT: True, Attribute.WRAP: True}
HSM_CALLS = {
    "create_aes": lambda s, key: hk.create_aes(s, bytes(range(16)), usage=hk.KCV_USAGE),
    "check_value": lambda s, key: hk.check_value(key),
    "gcm_decrypt": lambda s, key: hk.gcm_decrypt(key, bytes(12), bytes(32)),
    # The per-key loops' direct calls (keysvc/hsm/direct.py) on the same object, by handle.
    "create_session_key": lambda s, key: hk.create_session_key(s, bytes(range(16)),
                                                              hk.KCV_USAGE),
    "check_value of a SessionKey": lambda s, key: hk.check_value(hk.SessionKey(s, key.handle)),
    "wrap of a SessionKey": lambda s, key: hk.wrap(key, hk.SessionKey(s, key.handle)),
    "unwrap_session_key": lambda s, key: hk.unwrap_session_key(s, key, bytes(24),
                                                              hk.Unwrap.AES_KW, hk.KCV_USAGE),
    "destroy of a SessionKey": lambda s, key: hk.destroy(hk.SessionKey(s, key.handle)),
}


@pytest.mark.parametrize("call", sorted(HSM_CALLS))
def test_a_session_that_dies_under_an_hsm_keys_call_is_not_returned_to_the_pool(app, call):
    token = _token(app, pool_size=2)
    try:
        with pytest.raises(HsmUnavailable):
            with token.session() as dying:
                key = hk.create_aes(dying, bytes(range(32)), usage=MAC_AND_DECRYPT)
                dying.raw.close()  # the session handle goes away under the call
                HSM_CALLS[call](dying, key)
        assert token.idle == 0
    finally:
        token.close()
