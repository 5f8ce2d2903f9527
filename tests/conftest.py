"""Shared fixtures: one real SoftHSM2 state for the whole run, a fresh database per test.

SoftHSM2 reads its configuration once per process, so every in-process test shares one
state directory and its tokens (key labels are unique per test); each test gets its own
SQLite database unless KEYSVC_TEST_DATABASE_URL points the suite at PostgreSQL.
PKCS11_MODULE / KEYSVC_* variables may point the suite at another PKCS#11 module.
"""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keysvc import config  # noqa: E402
from keysvc.app import App, Caller  # noqa: E402
from keysvc.devstate import ensure_dev_state, point_softhsm_at  # noqa: E402
from keysvc.store import Store  # noqa: E402

SHARED = Path(os.environ.get("KEYSVC_SHARED", ROOT.parent / "shared"))
EXAMPLES = SHARED / "spec" / "examples"

OFFICER_1 = Caller("security-officer-1", "security-officer")
OFFICER_2 = Caller("security-officer-2", "security-officer")
OFFICER_3 = Caller("security-officer-3", "security-officer")
S1SP = Caller("s1sp", "s1sp")
DCO = Caller("dco", "dco")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory) -> Path:
    d = Path(os.environ.get("KEYSVC_TEST_STATE") or tmp_path_factory.mktemp("state"))
    settings = config.load(env={}, state_dir=d)
    ensure_dev_state(settings)
    point_softhsm_at(settings)
    return d


def _database_url(tmp_path: Path) -> str:
    base = os.environ.get("KEYSVC_TEST_DATABASE_URL")
    if base:
        return base
    return f"sqlite:///{tmp_path / 'keysvc.db'}"


@pytest.fixture(scope="session")
def _partitions(state_dir):
    from keysvc.partitions import Partitions
    settings = config.load(env={}, state_dir=state_dir)
    p = Partitions(settings)
    p.bootstrap()
    yield p
    p.close()


@pytest.fixture()
def app(state_dir, _partitions, tmp_path, request) -> App:
    from keysvc.device_certificate import TrustStore
    url = _database_url(tmp_path)
    settings = config.load(env={}, state_dir=state_dir, database_url=url)
    store = Store(url)
    if not store.is_sqlite:
        _reset_postgres(store)
    store.migrate()
    a = App(settings, store, _partitions, TrustStore(anchors=()))
    yield a
    store.close()


def _reset_postgres(store: Store) -> None:
    from sqlalchemy import text
    with store.engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One real server for the end-to-end tests, trusting the examples' device CAs."""
    from tests.serverproc import start_server
    anchors = sorted(EXAMPLES.glob("*/device_ca.pem"))
    srv = start_server(tmp_path_factory.mktemp("server"), trust_anchors=anchors)
    yield srv
    srv.stop()
