"""Shared fixtures: one real SoftHSM2 state for the whole run, a fresh database per test.

SoftHSM2 reads its configuration once per process, so every in-process test shares one
state directory and its tokens (key labels are unique per test); each test gets its own
SQLite database unless KEYSVC_TEST_DATABASE_URL points the suite at PostgreSQL.
PKCS11_MODULE / KEYSVC_* variables may point the suite at another PKCS#11 module.
"""
from __future__ import annotations

import functools
import os
import re
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

def _officer(name: str) -> Caller:
    """An in-process officer: a key fingerprint of its own, enrolled by `make_app`."""
    import hashlib
    return Caller(name, "security-officer", hashlib.sha256(name.encode()).hexdigest())


OFFICER_1 = _officer("security-officer-1")
OFFICER_2 = _officer("security-officer-2")
OFFICER_3 = _officer("security-officer-3")
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


def make_app(settings_dir: Path, partitions, url: str) -> App:
    from keysvc.device_certificate import TrustStore
    settings = config.load(env={}, state_dir=settings_dir, database_url=url, dev=True)
    store = Store(url)
    if not store.is_sqlite:
        _reset_postgres(store)
    store.migrate()
    app = App(settings, store, partitions, TrustStore(anchors=()))
    _enroll_test_officers(app)
    return app


def _enroll_test_officers(app: App) -> None:
    """The in-process officers are in the (shared) token's roster, as enrolled officers
    are: an approval counts only for an enrolled key."""
    from dataclasses import replace

    from keysvc.identity.roster import Officer
    wanted = [Officer(o.fingerprint, o.identity) for o in (OFFICER_1, OFFICER_2, OFFICER_3)]
    if all(o in app.roster.current().officers for o in wanted):
        return
    app.roster.change(lambda st: replace(st, officers=tuple(
        [o for o in st.officers if o not in wanted] + wanted)))


@pytest.fixture()
def app(state_dir, _partitions, tmp_path) -> App:
    a = make_app(state_dir, _partitions, _database_url(tmp_path))
    yield a
    a.store.close()


def postgres_url() -> str | None:
    """The test PostgreSQL (make test starts one); in CI its absence is a failure. Each
    pytest-xdist worker has a database of its own (tests reset the schema they use)."""
    url = os.environ.get("KEYSVC_TEST_PG_URL")
    if not url and os.environ.get("CI"):
        pytest.fail("KEYSVC_TEST_PG_URL is not set: run the suite with `make test`")
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    return _worker_database(url, worker) if url and worker else url


@functools.lru_cache(maxsize=None)
def _worker_database(base: str, worker: str) -> str:
    import psycopg
    name = f"keysvc_test_{re.sub(r'[^a-z0-9]', '', worker.lower())}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    return base.rsplit("/", 1)[0] + "/" + name


def fresh_postgres_database(prefix: str) -> str:
    """A new, empty database on the test PostgreSQL cluster (skips without one): its URL."""
    import psycopg
    base = postgres_url()
    if not base:
        pytest.skip("no test PostgreSQL (run `make test`)")
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return base.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgresql"])
def any_app(request, state_dir, _partitions, tmp_path) -> App:
    """The same test against both stores."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'keysvc.db'}"
    else:
        url = postgres_url()
        if not url:
            pytest.skip("no test PostgreSQL (run `make test`)")
    a = make_app(state_dir, _partitions, url)
    yield a
    a.store.close()


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
