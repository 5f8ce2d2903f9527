"""The token store lock (keysvc/hsm/store_lock.py): SoftHSM2 2.6.1's file store lets one
process's search spoil another's token write, so keysvc's processes take turns on it.

Real SoftHSM2 throughout; the two-process rule runs keysvc.hsm in two fresh processes on a
token of its own (tests/support/store_race.py). `python -m bench.bench_store_lock` shows
the same load without the lock: searches fail and new keys come back empty.
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from keysvc.hsm import HsmUnavailable, Token, TokenConfig
from keysvc.hsm import keys as hk
from keysvc.hsm.store_lock import StoreBusy, StoreLock, for_token, token_list_lock
from keysvc.hsm.token import _module
from tests.support.encoder import kcv

ROOT = Path(__file__).resolve().parent.parent
SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"


def race_token(tmp_path: Path) -> dict:
    """A SoftHSM2 token of its own (label `race`), as the environment of a process using it."""
    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\n"
                    "objectstore.backend = file\nlog.level = ERROR\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf), "RACE_PIN": "1234"}
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "race",
                    "--so-pin", "5678", "--pin", "1234"], env=env, check=True,
                   capture_output=True)
    return env


def race(env: dict, seconds: float, *extra: str) -> tuple[dict, dict, dict]:
    """(search counts, create counts, a fresh process's view of the token)."""
    def start(role: str, secs: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "tests.support.store_race", role,
                                 str(secs), *extra], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, text=True)
    search, create = start("search", seconds), start("create", seconds)
    out = [json.loads(p.communicate(timeout=seconds + 60)[0]) for p in (search, create)]
    check = start("check", 0)
    return out[0], out[1], json.loads(check.communicate(timeout=60)[0])


def test_objects_made_while_another_process_searches_the_token_stay_whole(tmp_path):
    searched, created, token = race(race_token(tmp_path), 6)
    assert searched["failures"] == {} and created["failures"] == {}
    assert created["unreadable"] == 0
    assert token["keys"] == {label: [32] for label in created["kept"]}
    assert token["data"] == {"d" + label: [label] for label in created["kept"]}
    assert token["unlabelled_data"] == 0
    # Neither side starves the other: the writer's turnstile against a stream of searches.
    assert searched["searches"] > 100 and created["made"] > 100


@contextmanager
def held_by_another_process(lock: StoreLock, op: int):
    """The lock file taken as another process would: a separate open file (flock conflicts
    between open files, in one process as in two)."""
    assert lock.path is not None
    fd = os.open(lock.path, os.O_RDWR)
    fcntl.flock(fd, op)
    try:
        yield
    finally:
        os.close(fd)


@pytest.fixture()
def impatient(app):
    token = app.partitions.s1sp
    before, token.store.timeout = token.store.timeout, 0.3
    yield token
    token.store.timeout = before


def test_a_search_waits_while_another_process_writes_the_token(impatient):
    with impatient.session() as s:
        hk.secret_key_labels(s)  # opens the lock file
        with held_by_another_process(impatient.store, fcntl.LOCK_EX):
            with pytest.raises(StoreBusy, match="another process holds its object store"):
                hk.secret_key_labels(s)
        assert hk.secret_key_labels(s)


def test_a_token_write_waits_while_another_process_searches_the_token(impatient):
    with impatient.session() as s:
        hk.secret_key_labels(s)
        with held_by_another_process(impatient.store, fcntl.LOCK_SH):
            assert hk.secret_key_labels(s)  # searches share
            with pytest.raises(StoreBusy, match="another process holds its object store"):
                hk.put_data(s, "store-lock-test", b"x")
        assert not hk.data_values(s, "store-lock-test")


def test_using_keys_and_session_objects_takes_no_store_lock(impatient):
    with impatient.session() as s:
        hk.secret_key_labels(s)
        with held_by_another_process(impatient.store, fcntl.LOCK_EX):
            s.retire_after_use()
            value = os.urandom(16)
            key = hk.create_session_key(s, value, hk.PLAINTEXT_KEY_USAGE)
            assert hk.check_value(key) == kcv(value, "CMAC")
            hk.destroy(key)


def test_a_login_waits_while_another_process_reads_the_token_list(app):
    """Every C_Login rewrites its token's own file, which the slot list and C_Initialize of
    every other process read: logins hold the token-list lock exclusively."""
    s1sp = app.partitions.s1sp.config
    mod = _module(s1sp.module)
    fresh = Token(TokenConfig(s1sp.module, s1sp.label, s1sp.pin))
    before, mod.tokens.timeout = mod.tokens.timeout, 0.3
    try:
        with held_by_another_process(mod.tokens, fcntl.LOCK_SH):
            with pytest.raises(StoreBusy, match="the token list"):
                with fresh.session():
                    pass
        with fresh.session() as s:  # busy was not down: no wait, no re-initialise
            assert hk.secret_key_labels(s)
    finally:
        mod.tokens.timeout = before
        fresh.close()


def test_the_health_check_calls_a_token_another_process_is_writing_alive(impatient):
    with impatient.session() as s:
        hk.secret_key_labels(s)
    with held_by_another_process(impatient.store, fcntl.LOCK_EX):
        assert impatient.check()


def test_a_search_inside_a_write_shares_its_hold_and_a_write_inside_a_search_is_refused(
        impatient):
    with impatient.session() as s:
        with s.store.exclusive():
            assert hk.secret_key_labels(s)
        with s.store.shared(), pytest.raises(RuntimeError, match="a write inside a search"):
            hk.put_data(s, "store-lock-test", b"x")


def test_only_softhsm2_with_a_file_store_is_locked(tmp_path, monkeypatch):
    conf = tmp_path / "softhsm2.conf"
    tokens = tmp_path / "tokens"
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    conf.write_text(f"directories.tokendir = {tokens}\n")
    assert for_token(SOFTHSM, "s1sp", 1.0).path == tokens / ".keysvc-store-s1sp.lock"
    # read as SoftHSM2 reads it: a comment after a value, spaces, other settings
    conf.write_text(f"# tokens\ndirectories.tokendir = {tokens}   # ours\n"
                    "objectstore.backend = file # the default\nlog.level = INFO\n")
    assert for_token(SOFTHSM, "s1sp", 1.0).path == tokens / ".keysvc-store-s1sp.lock"
    # the module under another name is still SoftHSM2
    (tmp_path / "hsm.so").symlink_to(SOFTHSM)
    assert for_token(str(tmp_path / "hsm.so"), "s1sp", 1.0).path is not None
    # another vendor's module, or SoftHSM2's database store: that store serialises itself
    assert for_token("/opt/vendor/lib/libvendorpkcs11.so", "s1sp", 1.0).path is None
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = db\n")
    assert for_token(SOFTHSM, "s1sp", 1.0).path is None


def test_the_store_lock_file_cannot_be_a_symlink(tmp_path):
    (tmp_path / "elsewhere").write_text("")
    (tmp_path / "store.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(HsmUnavailable, match="cannot open its store lock .*ELOOP"):
        with StoreLock(tmp_path / "store.lock", "token t").shared():
            pass


def test_a_busy_token_list_re_reads_nothing_and_voids_no_handle(app):
    mod = _module(app.partitions.s1sp.config.module)
    before, mod.tokens.timeout = mod.tokens.timeout, 0.2
    generation = mod.generation
    try:
        with held_by_another_process(mod.tokens, fcntl.LOCK_EX):
            with pytest.raises(StoreBusy):
                mod.reinitialize()
        assert mod.generation == generation
    finally:
        mod.tokens.timeout = before


def test_the_development_set_up_lists_and_makes_tokens_holding_the_token_list(
        tmp_path, monkeypatch):
    """A listing made while another process logs in can miss that token, and a second
    token of the same label would follow."""
    from keysvc import config, devstate
    settings = config.load(env={}, state_dir=tmp_path / "state")
    tokens = tmp_path / "state" / "hsm" / "tokens"
    tokens.mkdir(parents=True)
    monkeypatch.setattr(devstate, "DEV_TOKENS_WAIT", 0.2)
    lock = token_list_lock(tokens.resolve(), 1.0)
    assert lock.path is not None
    lock.path.touch()
    with held_by_another_process(lock, fcntl.LOCK_SH):
        with pytest.raises(StoreBusy, match="the token list"):
            devstate.ensure_dev_state(settings)
    assert not [p for p in tokens.iterdir() if p.is_dir()]  # no token made meanwhile


@pytest.mark.parametrize("locked", [True, False], ids=["copied-in", "made-in-token"])
def test_an_rsa_pair_is_made_unwrap_only_and_unmodifiable_however_it_reaches_the_token(
        impatient, locked):
    """With the store lock (SoftHSM2's file store) the pair is generated as session objects
    and only the copies hold the store alone (generating takes 0.3 to 0.7 s); without it,
    generated in the token. Either way the token's pair is what generating it there makes:
    made in the HSM (CKA_LOCAL), never extractable, always sensitive, unwrap only, and
    unmodifiable, so no session can turn decryption on."""
    label = f"store-lock-rsa-{locked}-{os.getpid()}"
    with impatient.session() as s:
        if not locked:
            s.store = StoreLock(None, "token t")
        try:
            der = hk.generate_rsa(s, label, 2048, key_id="job-1")
            priv = hk.find_private_key(s, label)
            pub = hk.find_key(s, label, hk.ObjectClass.PUBLIC_KEY)
            assert hk.public_key_der(pub) == der
            assert all(priv[a] for a in (hk.A.TOKEN, hk.A.LOCAL, hk.A.SENSITIVE,
                                         hk.A.ALWAYS_SENSITIVE, hk.A.NEVER_EXTRACTABLE,
                                         hk.A.PRIVATE, hk.A.UNWRAP))
            assert not any(priv[a] for a in (hk.A.EXTRACTABLE, hk.A.DECRYPT, hk.A.SIGN,
                                             hk.A.SIGN_RECOVER, hk.A.DERIVE,
                                             hk.A.MODIFIABLE))
            assert bytes(priv[hk.A.ID]) == bytes(pub[hk.A.ID]) == b"job-1"
            with pytest.raises(Exception):
                priv[hk.A.DECRYPT] = True
            with pytest.raises(Exception):
                priv.copy({hk.A.DECRYPT: True, hk.A.TOKEN: False})
            found = [(o[hk.A.CLASS], o[hk.A.TOKEN]) for o in hk.objects(s, {hk.A.LABEL: label})]
            assert sorted(found) == [(hk.ObjectClass.PUBLIC_KEY, True),
                                     (hk.ObjectClass.PRIVATE_KEY, True)]
        finally:
            s.store = impatient.store
            hk.destroy_objects(s, label)


def test_a_new_session_waits_while_another_process_logs_in_and_busy_is_not_down(app):
    """C_OpenSession reads the token's own file, which a login elsewhere rewrites."""
    s1sp = app.partitions.s1sp.config
    mod = _module(s1sp.module)
    fresh = Token(TokenConfig(s1sp.module, s1sp.label, s1sp.pin, retry_after=60.0))
    before, mod.tokens.timeout = mod.tokens.timeout, 0.3
    try:
        with fresh.session() as s:
            s.retire_after_use()  # the next borrow opens a new session
        with held_by_another_process(mod.tokens, fcntl.LOCK_EX):
            with pytest.raises(StoreBusy, match="the token list"):
                with fresh.session():
                    pass
        with fresh.session() as s:  # not marked down: no 60 s wait
            assert hk.secret_key_labels(s)
    finally:
        mod.tokens.timeout = before
        fresh.close()
