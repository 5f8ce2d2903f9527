"""Online rewrap: every stored device and master key moved from older storage-key versions
to the primary, inside the HSM, while the service runs.

Per row: C_UnwrapKey under the row's version into a session object, its CMAC check value
computed in the HSM and compared with the row's sealed KCV, C_WrapKey under the primary,
a new seal naming the primary; no key bits reach this process. A batch of rows is then
written in one transaction, each row only if it is still the one that was read.

- Resumable: the checkpoint is the rows themselves (each names its version). A kill -9
  loses at most the batch in flight, which is done again; no row is done twice (the second
  write finds the version changed and leaves it).
- Throttled: at most `rate` rows a second (setting `rewrap_rows_per_second`), in batches
  of `batch`, each in a session of its own and with a breath for live calls in between.
- Visible: `keysvc_rewrap_remaining_rows{partition}`, `keysvc admin rewrap-status`, and an
  audit event with the count per version when a partition has none left on old versions.
- A row that fails its seal or whose check value differs is flagged (audited) and left on
  its old version, so that its version cannot be destroyed (`rotation.py`).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from prometheus_client import Counter, Gauge

from keysvc.custody import versions
from keysvc.hsm import keys as hk
from keysvc.partitions import STORAGE_KEY

log = logging.getLogger("keysvc.custody.rewrap")

BREATHE_EVERY = 32  # rows between chances for live calls to use the HSM (about 3 ms)

REMAINING = Gauge("keysvc_rewrap_remaining_rows",
                  "stored keys still wrapped under an older storage-key version",
                  ["partition"])
DONE = Counter("keysvc_rewrap_rows_total", "stored keys rewrapped to the primary version",
               ["partition"])


@dataclass
class Progress:
    """What `rewrap status` shows for a partition (this process's view)."""

    remaining: int = 0
    done: int = 0
    rows_per_second: float = 0.0
    bad: set[str] = field(default_factory=set)
    started: float = 0.0
    reported: bool = True   # the end of the last run is audited
    cursor: tuple | None = None  # the primary key of the last row read in this pass
    pass_done: int = 0           # rows this pass moved
    primary: int = 0             # the storage-key version this run moves rows to

    @property
    def flagged(self) -> int:
        return len(self.bad)


def stored_keys(app: Any, partition: str) -> Any:
    """The stored keys a partition's storage key wraps: device keys (S1SP), master keys."""
    return app.records.device_keys if partition == "s1sp" else app.records.master_keys


class Rewrap:
    """The background job of one server (run in a process of its own by worker 0)."""

    PARTITIONS = ("s1sp", "dco")

    def __init__(self, app: Any, rate: float, batch: int = 500, idle: float = 5.0,
                 shared: dict[str, Any] | None = None,
                 hsm_loop: Callable[[Callable[[], Any]], Any] | None = None) -> None:
        """`shared`: per partition, the shared memory a parent process reads the progress
        from; `hsm_loop`: what runs each batch's HSM work (the rewrap process's SCHED_IDLE
        thread: keysvc/custody/rewrap_process.py)."""
        self.app = app
        self.hsm_loop = hsm_loop or (lambda fn: fn())
        self.shared = shared or {}
        self.rate = max(1.0, rate)
        self.batch = batch
        self.idle = idle
        # The storage-key partitions this process serves (one job per partition's process).
        self.partitions = tuple(p for p in self.PARTITIONS if p in app.partitions.tokens)
        self.progress = {p: Progress() for p in self.PARTITIONS}
        self.bad_escrows: set[str] = set()
        self._escrow_cursor = ""  # the id where the last re-seal pass stopped
        self._stop = threading.Event()

    # ------------------------------------------------------------------ one batch
    def primary(self, partition: str) -> int:
        with self.app.partitions.tokens[partition].session() as s:
            return versions.storage(s)[0]

    def step(self, partition: str) -> tuple[int, bool]:
        """Rewrap one batch of `partition`: (rows written, whether anything was looked at;
        False: nothing left that can be done)."""
        stored = stored_keys(self.app, partition)
        token = self.app.partitions.tokens[partition]
        prog = self.progress[partition]
        with token.session() as s:
            present = versions.versions(s, STORAGE_KEY)
        primary = present[-1]
        rows, bad, last = stored.on_older_versions(primary, self.batch, frozenset(prog.bad),
                                                   prog.cursor)
        if last is None:
            # The end of the table: once more from its start if this pass moved rows (a
            # row changed under it is behind the cursor now), else done.
            again = prog.cursor is not None and prog.pass_done > 0
            prog.cursor, prog.pass_done = None, 0
            return 0, again
        prog.cursor = last
        prog.bad.update(bad)
        for k in [k for k in rows if k.key_version not in present]:
            # A row put back on a destroyed version (its seal is an old, valid one): it
            # cannot be read, and must not stop the others.
            name = stored.record_name(k)
            prog.bad.add(name)
            self.app.records.flag(name, f"names storage key version {k.key_version}, which "
                                        "is destroyed; not rewrapped")
        rows = [k for k in rows if k.key_version in present]
        if not rows:
            return 0, True  # read on from the cursor

        def work(sess: Any) -> list[tuple[Any, Any]]:
            sess.retire_after_use()  # session copies of the storage keys
            new = hk.session_copy(sess, versions.storage(sess, primary)[1])
            old: dict[int, Any] = {}
            out: list[tuple[Any, Any]] = []
            for n, k in enumerate(rows, 1):
                if n % BREATHE_EVERY == 0:
                    token.breathe()  # live calls reach the HSM between a few rows
                if k.key_version not in old:
                    old[k.key_version] = hk.session_copy(
                        sess, versions.storage(sess, k.key_version)[1])
                obj = hk.unwrap_session_key(sess, old[k.key_version], k.wrapped,
                                            hk.Unwrap.AES_KW, hk.KCV_USAGE)
                try:
                    kcv = hk.check_value(obj)
                    if kcv != k.kcv:
                        out.append((k, None))
                        continue
                    moved = type(k)(k.device_id, k.role, k.name, k.chf_identifier,
                                    k.file_id, primary, k.kcv, hk.wrap(new, obj))
                finally:
                    hk.destroy(obj)
                out.append((k, moved))
            return out
        changes = self.hsm_loop(lambda: token.run(work))
        for k, moved in changes:
            if moved is None:
                name = stored.record_name(k)
                prog.bad.add(name)
                self.app.records.flag(name, "its key's check value is not the one sealed; "
                                            "not rewrapped")
        olds = [k for k, moved in changes if moved is not None]
        # Sealed as S1SP and DCO seal theirs, once the rows to write are final.
        sealed = self.hsm_loop(lambda: stored.sealed([m for _, m in changes if m is not None]))
        good = [(k, moved, seal) for k, (moved, seal) in zip(olds, sealed)]
        with self.app.store.tx() as conn:
            n = stored.rewrapped(conn, good)
        DONE.labels(partition).inc(n)
        prog.done += n
        prog.pass_done += n
        return n, True  # rows changed under it are found again by the next pass

    # ------------------------------------------------------------------ the job
    def refresh(self, partition: str) -> dict[int, int]:
        counts = stored_keys(self.app, partition).count_by_version()
        primary = self.primary(partition)
        remaining = sum(n for v, n in counts.items() if v < primary)
        self.progress[partition].remaining = remaining
        REMAINING.labels(partition).set(remaining)
        self._share(partition)
        return counts

    def _share(self, partition: str) -> None:
        """The progress where the parent process reads it (if there is one)."""
        values = self.shared.get(partition)
        if values is not None:
            prog = self.progress[partition]
            values[:] = [prog.done, prog.rows_per_second, prog.flagged, prog.remaining]

    def run_partition(self, partition: str, deadline: float | None = None) -> None:
        """Rewrap until nothing is left (or the deadline or a stop)."""
        prog = self.progress[partition]
        self.refresh(partition)
        primary = self.primary(partition)
        if primary != prog.primary:  # a new rotation: rows flagged before are looked at again
            prog.bad.clear()
            prog.primary, prog.cursor, prog.pass_done = primary, None, 0
        if prog.remaining <= len(prog.bad):
            return
        prog.started, prog.reported, start_done = time.monotonic(), False, prog.done
        while not self._stop.is_set() and (deadline is None or time.monotonic() < deadline):
            t0 = time.monotonic()
            n, looked = self.step(partition)
            prog.remaining = max(0, prog.remaining - n)
            REMAINING.labels(partition).set(prog.remaining)
            elapsed = time.monotonic() - prog.started
            prog.rows_per_second = (prog.done - start_done) / elapsed if elapsed else 0.0
            self._share(partition)
            if not looked:
                break
            pause = n / self.rate - (time.monotonic() - t0)
            if pause > 0:
                self._stop.wait(pause)
        counts = self.refresh(partition)
        if prog.remaining <= len(prog.bad) and not prog.reported:
            prog.reported = True
            self.app.audit.append(
                actor="keysvc", role="", action="custody.rewrap",
                target=f"{partition}: {prog.done - start_done} rows rewrapped to storage-key "
                       f"v{self.primary(partition)}; rows by version now "
                       + ", ".join(f"v{v}: {n}" for v, n in sorted(counts.items()))
                       + (f"; {len(prog.bad)} rows left on their version (flagged)"
                          if prog.bad else ""))

    def reseal_escrows(self, most: int = 1000) -> int:
        """Escrow records sealed under another escrow-seal version than the primary, sealed
        again under it (a handful of records: one transaction each, at most `most` a pass,
        in id order from where the last pass stopped, so that no number of altered rows
        starves the others). A record that fails its seal or anchor is left on its version,
        which then cannot be destroyed; each pass audits those it met in one event (a
        database writer's junk rows must not flood the log). A database or HSM that is
        away pauses the pass: no record is called altered for that."""
        from keysvc.partitions import ESCROW_SEAL_KEY
        from keysvc.records.escrows import EscrowTampered
        escrows = self.app.records.escrows
        with self.app.partitions.admin.session() as s:
            primary = versions.primary(s, ESCROW_SEAL_KEY)
        done, tried, bad = 0, 0, []
        try:
            while not self._stop.is_set() and tried < most:
                ids = escrows.not_on_primary(primary, self._escrow_cursor)
                if not ids:
                    if not self._escrow_cursor:
                        break
                    self._escrow_cursor = ""  # the end: from the start next pass
                    break
                for eid in ids:
                    self._escrow_cursor = eid
                    if eid in self.bad_escrows:
                        continue
                    tried += 1
                    try:
                        done += escrows.reseal(eid, primary)
                    except EscrowTampered:
                        self.bad_escrows.add(eid)
                        bad.append(eid)
        except EscrowTampered:  # the table holds an id that cannot even be read
            if "escrows" not in self.bad_escrows:
                self.bad_escrows.add("escrows")
                self.app.records.flag("escrows", "holds an escrow id that cannot be read; "
                                                 "records are not sealed again until it goes")
        finally:
            if bad:
                self.app.records.flag(f"escrows/{bad[0]}", (
                    f"and {len(bad) - 1} more escrow records " if len(bad) > 1 else "") +
                    "fail their HSM seal or anchor or cannot be read; not sealed again "
                    f"under escrow-seal v{primary}")
        if done:
            counts = escrows.count_by_version()
            self.app.audit.append(
                actor="keysvc", role="", action="custody.rewrap",
                target=f"admin: {done} escrow records sealed again under escrow-seal "
                       f"v{primary}; records by version now "
                       + ", ".join(f"v{v}: {n}" for v, n in sorted(counts.items())))
        return done

    def run(self, stop: threading.Event) -> None:
        """The job, until `stop` is set (its own process: keysvc/custody/rewrap_process.py)."""
        self._stop = stop
        while not self._stop.is_set():
            for p in self.partitions:
                try:
                    self.run_partition(p)
                except Exception as exc:  # the HSM or database is away: try again later
                    log.warning("rewrap of %s paused: %s", p,
                                str(getattr(exc, "message", "")) or type(exc).__name__)
            try:
                self.reseal_escrows()
            except Exception as exc:
                log.warning("escrow re-seal paused: %s",
                            str(getattr(exc, "message", "")) or type(exc).__name__)
            self._stop.wait(self.idle)
