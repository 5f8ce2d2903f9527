"""Storage: SQLite (embedded default) or PostgreSQL, chosen by the database URL.

SQLAlchemy Core gives both dialects one vocabulary; the schema is versioned with Alembic
(keysvc/migrations) and upgraded on start. Writes run in one transaction per request:
SQLite transactions begin IMMEDIATE so two writers queue instead of deadlocking on a lock
upgrade; PostgreSQL serialises the few hot spots with row locks (audit head, escrow row).
"""
from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Iterator

from sqlalchemy import (
    Boolean,
    Column,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    text,
)
from sqlalchemy import DateTime as _DateTime
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.types import TypeDecorator

from keysvc import tracing

metadata = MetaData()
WRITE_WAIT_SECONDS = 30  # the longest a writer waits for the database's write lock


class DateTime(TypeDecorator):
    """Instants stored in UTC and read back aware, whatever zone the clock used.

    SQLite keeps only wall time; without this a London-time clock would be read back as
    UTC, and every HMAC over a timestamp (audit chain, escrow seal) would fail to verify.
    """

    impl = _DateTime
    cache_ok = True

    def __init__(self, timezone: bool = True) -> None:
        super().__init__(timezone=timezone)

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        value = value.astimezone(dt.timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None \
            else value.astimezone(dt.timezone.utc)

keys = Table(
    "keys", metadata,
    Column("name", String(128), primary_key=True),
    Column("partition", String(16), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("algorithm", String(32), nullable=False),
    Column("owner_id", String(64), nullable=False, default=""),
    Column("owner_type", String(32), nullable=False, default=""),
    Column("kcv", String(16), nullable=False, default=""),
    Column("state", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("public_key_pem", Text, nullable=False, default=""),
    Column("allowed_originators", Text, nullable=False, default="[]"),
    # CKA_ID of the token object: the operation that made it (crash reconciliation, and the
    # object is cross-checked against its record on every use).
    Column("key_id", String(64), nullable=False, default=""),
    Column("seal", LargeBinary, nullable=True),
)

import_jobs = Table(
    "import_jobs", metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("partition", String(16), nullable=False),
    Column("public_key_pem", Text, nullable=False),
    Column("created_by", String(128), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("seal", LargeBinary, nullable=True),
)

operations = Table(
    "operations", metadata,
    Column("id", String(64), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("target", String(128), nullable=False),
    Column("state", String(16), nullable=False),
    Column("requested_by", String(128), nullable=False),
    Column("approvals", Text, nullable=False, default="[]"),
    Column("payload", Text, nullable=False, default="{}"),
    Column("message", Text, nullable=False, default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("partition", String(16), nullable=False, default=""),
    Column("seal", LargeBinary, nullable=True),
)

migration_files = Table(
    "migration_files", metadata,
    Column("file_id", String(64), primary_key=True),
    Column("service", String(8), primary_key=True),
    Column("digest", String(64), nullable=False),
    Column("result", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("seal", LargeBinary, nullable=True),
)

device_keys = Table(
    "device_keys", metadata,
    Column("device_id", String(23), primary_key=True),
    Column("role", String(16), primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("chf_identifier", String(23), nullable=False),
    Column("wrapped", LargeBinary, nullable=False),
    Column("kcv", String(16), nullable=False),
    Column("file_id", String(64), nullable=False, index=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("key_version", Integer, nullable=False, default=1, index=True),
    Column("seal", LargeBinary, nullable=True),
)

master_keys = Table(
    "master_keys", metadata,
    Column("device_id", String(23), primary_key=True),
    Column("chf_identifier", String(23), nullable=False),
    Column("wrapped", LargeBinary, nullable=False),
    Column("kcv", String(16), nullable=False),
    Column("file_id", String(64), nullable=False, index=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("key_version", Integer, nullable=False, default=1, index=True),
    Column("seal", LargeBinary, nullable=True),
)

def undecodable(exc: BaseException) -> bool:
    """SQLite keeps bytes that are no UTF-8 in a text column, and its driver refuses to
    hand them over (OperationalError "Could not decode ..."): an altered row, not a
    database that is away."""
    return "Could not decode" in str(getattr(exc, "orig", exc))


escrows = Table(
    "escrows", metadata,
    Column("id", String(64), primary_key=True),
    Column("smso_id", String(64), nullable=False),
    Column("group_id", String(8), nullable=False),
    Column("chf_identifiers", Text, nullable=False),
    Column("certificates", Text, nullable=False),
    Column("valid_from", String(10), nullable=False),
    Column("valid_to", String(10), nullable=False),
    Column("max_releases", Integer, nullable=False),
    Column("note", Text, nullable=False, default=""),
    Column("releases", Integer, nullable=False, default=0),
    Column("revoked", Boolean, nullable=False, default=False),
    Column("deposited_by", String(128), nullable=False),
    Column("deposited_at", DateTime(timezone=True), nullable=False),
    Column("seal", LargeBinary, nullable=False),
    # the escrow-seal version the seal was made with (inside the seal from version 2 on)
    Column("seal_version", Integer, nullable=False, default=1, server_default="1"),
)

escrow_chfs = Table(
    "escrow_chfs", metadata,
    Column("escrow_id", String(64), primary_key=True),
    Column("chf_identifier", String(23), primary_key=True, index=True),
)

escrow_releases = Table(
    "escrow_releases", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("escrow_id", String(64), nullable=False, index=True),
    Column("actor", String(128), nullable=False),
    Column("reason", Text, nullable=False),
    Column("time", DateTime(timezone=True), nullable=False),
)

# One row: this database's identity. Token anchors are labelled with it, so that one token
# set may serve several databases (the test suite does) and an anchor never answers for
# another database's record. Changing it in the database only makes every record unanchored.
instance = Table(
    "instance", metadata,
    Column("id", Integer, primary_key=True),
    Column("instance_id", String(64), nullable=False),
)

audit_events = Table(
    "audit_events", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("id", String(64), nullable=False, unique=True),
    Column("time", DateTime(timezone=True), nullable=False),
    Column("actor", String(128), nullable=False),
    Column("role", String(32), nullable=False),
    Column("action", String(128), nullable=False),
    Column("target", Text, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("code", String(64), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Column("mac", String(80), nullable=False),  # "v<n>:" and 64 hex digits (versions.tagged)
)

# A call's audit event written inside the transaction of its effect (keysvc/audit/calls.py),
# until the audit writer chains it into audit_events.
audit_intents = Table(
    "audit_intents", metadata,
    Column("id", String(64), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("event", Text, nullable=False),
)

audit_head = Table(
    "audit_head", metadata,
    Column("id", Integer, primary_key=True),
    Column("seq", Integer, nullable=False),
    Column("hash", String(64), nullable=False),
)


def _normalise_url(url: str) -> str:
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


class Store:
    def __init__(self, url: str) -> None:
        self.url = _normalise_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        self._lock_path: str | None = None  # SQLite: the writer lock shared by processes
        self._lock_fd: int | None = None
        if self.is_sqlite:
            path = self.url.split("sqlite:///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                self._lock_path = path + ".writer-lock"
            self.engine: Engine = create_engine(
                self.url, connect_args={"check_same_thread": False, "timeout": 30},
                pool_size=16, max_overflow=16)
            _sqlite_immediate_transactions(self.engine)
        else:
            self.engine = create_engine(self.url, pool_size=16, max_overflow=16,
                                        pool_pre_ping=True)
        self._migrated = threading.Event()
        self._writer = threading.Lock()

    def migrate(self) -> None:
        from keysvc.migrations import upgrade
        upgrade(self.engine)
        self._migrated.set()

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        """One write transaction; commits on success, rolls back on any exception.

        `after_tx(conn, fn)` runs `fn` once the transaction has ended either way and the
        write lock is free (a refusal's audit event, which must survive the rollback).
        `before_commit`, if the current call set it, writes into the transaction just
        before it commits (the call's audit event: effect and event commit together)."""
        after: list[Callable[[], None]] = []
        hook = before_commit.get()
        on_commit: Callable[[], None] | None = None
        try:
            with tracing.span("db.transaction"), self._one_writer():
                with self.engine.connect() as conn:
                    conn.info["write"] = True
                    conn.info["after"] = after
                    _in_tx.depth = getattr(_in_tx, "depth", 0) + 1
                    try:
                        with conn.begin():
                            yield conn
                            if hook is not None:
                                on_commit = hook(conn)
                    finally:
                        _in_tx.depth -= 1
                        conn.info.pop("write", None)
                        conn.info.pop("after", None)
            if on_commit is not None:
                on_commit()
        finally:
            for fn in after:
                fn()

    @contextmanager
    def _one_writer(self) -> Iterator[None]:
        """SQLite: one writer at a time, woken as the writer before it ends.

        Left to SQLite, a writer that finds the database locked sleeps and retries with
        growing naps (busy_timeout: 1, 2, 5, 10 ... 100 ms), and under load a few wait a
        second for a lock that was free long before. So this process's writers queue on a
        lock here, and the one at the head takes a lock file shared with the other
        processes on the same database (the workers of one server, keysvc/processes.py),
        retried every millisecond at most. SQLite's own lock is then free when BEGIN
        IMMEDIATE asks for it. PostgreSQL has row locks and needs nothing."""
        if not self.is_sqlite:
            yield
            return
        deadline = time.monotonic() + WRITE_WAIT_SECONDS
        if not self._writer.acquire(timeout=WRITE_WAIT_SECONDS):
            raise TimeoutError("the database is busy: no write transaction in 30 s")
        try:
            fd = self._lock_processes(deadline)
            try:
                yield
            finally:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._writer.release()

    def _lock_processes(self, deadline: float) -> int | None:
        if self._lock_path is None:
            return None
        if self._lock_fd is None:
            self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                    0o600)
        nap = 0.0001
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self._lock_fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError("the database is busy: another process has held its "
                                       "write lock for 30 s") from None
                time.sleep(nap)
                nap = min(nap * 2, 0.001)

    @contextmanager
    def starting(self) -> Iterator[None]:
        """One process at a time through start-up: migrations, the first long-lived keys,
        the instance registration, the one-time upgrade and reconciliation. Two processes
        starting together on new tokens would otherwise each make `audit-mac` (a label
        then found twice: the token looks lost). SQLite: a lock file beside the database;
        PostgreSQL: a session advisory lock (replicas on other hosts)."""
        if self.is_sqlite:
            if self._lock_path is None:
                yield
                return
            fd = os.open(self._lock_path.replace(".writer-lock", ".start-lock"),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # (closing releases the lock)
            return
        with self.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(hashtext('keysvc-start'))"))
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(hashtext('keysvc-start'))"))
                conn.commit()

    def close(self) -> None:
        self.engine.dispose()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


# Set by the interceptor for one call: writes the call's audit event into each of its write
# transactions before they commit, and returns what to do once one has committed.
before_commit: ContextVar[Callable[[Connection], Callable[[], None] | None] | None] = \
    ContextVar("before_commit", default=None)
_in_tx = threading.local()


def in_write_tx() -> bool:
    """Is this thread inside a write transaction (where waiting for the audit writer, which
    needs the write lock too, would deadlock)?"""
    return getattr(_in_tx, "depth", 0) > 0


def after_tx(conn: Connection, fn: Callable[[], None]) -> None:
    """Run `fn` when `conn`'s write transaction has ended; at once outside one."""
    after = conn.info.get("after")
    if after is None:
        fn()
    else:
        after.append(fn)


def serialise(conn: Connection, topic: str) -> None:
    """Within a write transaction, one writer at a time for `topic` until it ends.

    SQLite needs nothing: a write transaction (BEGIN IMMEDIATE) already excludes every
    other writer. PostgreSQL takes a transaction-scoped advisory lock, so that a check and
    the insert it allows cannot interleave with another replica's.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:t))"), {"t": topic})


def _sqlite_immediate_transactions(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # Writers take the lock up front; readers use WAL snapshots and never block them.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("write") else "BEGIN")


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def loads(text: str) -> Any:
    return json.loads(text)
