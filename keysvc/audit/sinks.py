"""Where audit events go besides the database: places its writer cannot reach.

Every chained event is written to each sink before the call that made it returns:
- `JsonlSink`: an append-only JSON-lines file, fsynced per batch, rotated by size
  (`audit.jsonl`, `audit.jsonl.1`, ...); each line carries the event's sequence, hash and
  MAC, so the file can be checked against the chain (`verify_against`);
- `SyslogSink`: RFC 5424 messages over TCP with TLS (RFC 5425 octet counting), for a
  collector that keeps them.

A sink remembers the last sequence it holds (`cursor`); the writer fills any gap from the
database before the next batch (events another replica chained, or a batch this sink
missed while it was down), so each sink holds the whole chain from when it started.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import socket
import ssl
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

log = logging.getLogger("keysvc.audit.sinks")


class SinkError(Exception):
    pass


class JsonlSink:
    name = "jsonl"

    def __init__(self, path: Path, max_bytes: int = 64 * 1024 * 1024, keep: int = 10,
                 lock_timeout: float = 5.0) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.lock_timeout = lock_timeout
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.cursor: int | None = None
        self.cursor_hash = ""
        self._seen: tuple[int, int] | None = None  # (inode, size) when the cursor was read
        self._high: int | None = None  # the furthest this process has known the file go
        self._refresh()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """The file to oneself, its cursor as the file says.

        The worker processes of one server (keysvc/processes.py) append to this one file:
        each takes the lock, learns how far the file goes (another worker may have written
        since), fills the gap from the chain and appends its batch. So the file holds the
        whole chain before any call returns, whichever worker served it. The lock is waited
        for no longer than a call waits for its event (anyone who can open the lock file can
        hold it: then the calls fail closed, AUDIT_UNAVAILABLE)."""
        fd = os.open(self.path.with_name(self.path.name + ".lock"),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise SinkError(f"audit file {self.path.name}: its lock is held "
                                        f"longer than {self.lock_timeout:g} s") from None
                    time.sleep(0.0005)
            self._refresh()
            yield
        finally:
            os.close(fd)  # (and with it the lock)

    def _refresh(self) -> None:
        """Read the cursor again if the file changed since this process last looked.

        A file that now ends before where this process knew it to end was cut or deleted
        on the host: the cursor stays where it was (no new start marker, no refill of the
        cut lines), so that VerifyAuditLog names the missing events, and it is logged."""
        try:
            st = self.path.stat()
            seen: tuple[int, int] | None = (st.st_ino, st.st_size)
        except FileNotFoundError:
            seen = None
        if seen is not None and seen == self._seen:
            return
        last = last_line(self.path)
        cursor = int(last["seq"]) if last else None
        if self._high is not None and (cursor is None or cursor < self._high):
            log.error("audit file %s ends at sequence %s, before %d where it ended: it was "
                      "cut or deleted on this host", self.path.name, cursor, self._high)
            from keysvc.observability import AUDIT_FILE_CUT
            AUDIT_FILE_CUT.inc()
            self._seen = seen
            return
        self.cursor = cursor
        self.cursor_hash = str(last.get("hash", "")) if last else ""
        self._high = cursor
        self._seen = seen

    def write(self, lines: list[dict]) -> None:
        data = "".join(json.dumps(x, sort_keys=True, separators=(",", ":")) + "\n"
                       for x in lines).encode()
        try:
            if self.path.exists() and self.path.stat().st_size + len(data) > self.max_bytes:
                self._rotate()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise SinkError(f"audit file {self.path.name}: {exc.strerror or exc}") from None
        seqs = [x for x in lines if x.get("seq")]
        if seqs:
            self.cursor, self.cursor_hash = seqs[-1]["seq"], str(seqs[-1].get("hash", ""))
            self._high = max(self._high or 0, self.cursor)
        try:
            st = self.path.stat()
            self._seen = (st.st_ino, st.st_size)
        except FileNotFoundError:
            self._seen = None

    def _rotate(self) -> None:
        """`keep` files in all: the current one and keep-1 rotated ones. The oldest goes,
        and the new file says up to which sequence lines were let go, so that a check of
        the files tells rotation from deletion."""
        oldest = self.path.with_name(f"{self.path.name}.{self.keep - 1}")
        dropped = last_sequence_of(oldest) if oldest.exists() else None
        if oldest.exists():
            oldest.unlink()
        for i in range(self.keep - 2, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                older.rename(self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.keep > 1:
            self.path.rename(self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()
            dropped = self.cursor
        if dropped is not None:
            marker = json.dumps({"rotated_away_through": dropped}) + "\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, marker.encode())
            finally:
                os.close(fd)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def files_of(path: Path) -> list[Path]:
    """The sink's files, oldest first (rotated ones, then the current)."""
    rotated = sorted((p for p in path.parent.glob(path.name + ".*")
                      if p.suffix[1:].isdigit()), key=lambda p: -int(p.suffix[1:]))
    return rotated + ([path] if path.exists() else [])


def _parsed(raw: bytes) -> dict | None:
    """One line as a dict, or None (a torn last line after a crash, or anything that is not
    a JSON object: the files are the host's, and may hold anything)."""
    try:
        x = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(x, dict):
        return None
    seq = x.get("seq")
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 1):
        return None
    return x


def read_lines(path: Path) -> Iterator[dict]:
    """Every line of a sink and its rotated files, oldest first."""
    for f in files_of(path):
        with open(f, "rb") as fh:
            for raw in fh:
                x = _parsed(raw)
                if x is not None:
                    yield x


def last_line_of(f: Path) -> dict | None:
    """The last line of one file that names a sequence."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        fh.seek(max(0, size - 256 * 1024))
        tail = fh.read().splitlines()
    for raw in reversed(tail):
        x = _parsed(raw)
        if x is not None and x.get("seq"):
            return x
    return None


def last_sequence_of(f: Path) -> int | None:
    x = last_line_of(f)
    return int(x["seq"]) if x else None


def last_line(path: Path) -> dict | None:
    """The sink's last line that names a sequence (rotated files too), or None."""
    for f in reversed(files_of(path)):
        x = last_line_of(f)
        if x is not None:
            return x
    return None


def last_sequence(path: Path) -> int | None:
    """The highest sequence the sink holds, or None for a new sink."""
    x = last_line(path)
    return int(x["seq"]) if x else None


class SyslogSink:
    """RFC 5424 over TLS (RFC 5425): `<110>1 TIME HOST keysvc PID audit - JSON`, framed by
    octet counting. Facility 13 (log audit), severity 6 (informational)."""

    name = "syslog"

    def __init__(self, address: str, ca_file: str = "", cert_file: str = "", key_file: str = "",
                 timeout: float = 5.0) -> None:
        host, port = address.rsplit(":", 1)
        self.host, self.port, self.timeout = host, int(port), timeout
        self.context = ssl.create_default_context(cafile=ca_file or None)
        if cert_file:
            self.context.load_cert_chain(cert_file, key_file or None)
        self.cursor: int | None = None
        self._sock: ssl.SSLSocket | None = None
        self.hostname = socket.gethostname()[:255] or "-"

    def _connect(self) -> ssl.SSLSocket:
        if self._sock is None:
            raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
            self._sock = self.context.wrap_socket(raw, server_hostname=self.host)
        return self._sock

    def write(self, lines: list[dict]) -> None:
        frames = b"".join(self._frame(x) for x in lines)
        try:
            self._connect().sendall(frames)
        except (OSError, ssl.SSLError) as exc:
            self.close()
            raise SinkError(f"syslog {self.host}:{self.port}: {exc}") from None
        seqs = [x["seq"] for x in lines if x.get("seq")]
        if seqs:
            self.cursor = max(seqs)

    def _frame(self, x: dict) -> bytes:
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")
        msg = (f"<110>1 {now.replace('+00:00', 'Z')} {self.hostname} keysvc {os.getpid()} "
               f"audit - {json.dumps(x, sort_keys=True, separators=(',', ':'))}").encode()
        return str(len(msg)).encode() + b" " + msg

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None


def first_difference(chain: Iterable[dict], sink: Iterable[dict], upto: int | None = None
                     ) -> str:
    """Compare the database chain's events (dicts as in sink lines) with a sink's lines;
    "" if the sink agrees, else the first difference in words. `upto`: the chain's last
    sequence when it was read (lines after it were written since, and are not compared)."""
    by_seq: dict[int, dict] = {}
    unchained = []
    explained = {1}   # where the files may begin: the chain's start, a sink's start, a rotation
    for x in sink:
        if isinstance(x.get("sink_started_at"), int):
            explained.add(x["sink_started_at"])
        if isinstance(x.get("rotated_away_through"), int):
            explained.add(x["rotated_away_through"] + 1)
        if x.get("seq") and upto is not None and int(x["seq"]) > upto:
            continue
        if x.get("seq"):
            by_seq.setdefault(int(x["seq"]), x)
        elif x.get("unchained"):
            unchained.append(x)
    if not by_seq and not unchained:
        return ""
    start = min(by_seq) if by_seq else None
    if start is not None and start not in explained:
        return (f"the audit files begin at sequence {start}, and nothing says why: older "
                "lines were removed")
    seen = set()
    last = 0
    for e in chain:
        seq = int(e["seq"])
        last = seq
        if start is None or seq < start:
            continue
        seen.add(seq)
        s = by_seq.get(seq)
        if s is None:
            return f"event {seq} ({e['id']}) is in the database but not in the sink"
        if s.get("hash") != e["hash"] or s.get("id") != e["id"]:
            return f"event {seq} differs: the database has {e['id']}, the sink {s.get('id')}"
    extra = sorted(set(by_seq) - seen)
    if extra:
        x = by_seq[extra[0]]
        return (f"event {extra[0]} ({x.get('id')}, {x.get('action')}) is in the sink but not in "
                f"the database chain (which ends at {last})")
    chained_ids = {x.get("id") for x in by_seq.values()}
    for x in unchained:
        if x.get("id") not in chained_ids:
            return (f"event {x.get('id')} ({x.get('action')}) is in the sink but could not be "
                    "chained in the database")
    return ""
