"""Online rewrap (issue 15): 1,000,000 stored device keys moved to a new storage-key
version while clients call VerifyPrepaymentKey, on SQLite and on PostgreSQL.

For each database: the rows are made in the server's state (each a real device key,
wrapped under storage-key version 1 and sealed, in the HSM, as ProcessGroupInformation
stores them, but without files); the p99 of VerifyPrepaymentKey is measured with the
rewrap job off, then the storage key is rotated under dual control and measured again
while the job (throttled to `--rate` rows/s) moves every row. Printed: rows/s, total time,
the server's peak RSS, and the p99 during the rewrap against the p99 without it (the same
run, the same machine).

Targets: >= 3,000 rows/s and the live-call p99 at most doubled. The job runs in its own
process (keysvc-rewrap, nice 19); the peak RSS printed is the server's plus the job's.

    .venv/bin/python bench/bench_rewrap.py [--rows 1000000] [--rate 4000] [--database both]
PostgreSQL: `scripts/test-postgres start` first (KEYSVC_TEST_PG_URL).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, Tally, one_installation, start_serve

sys.path.insert(0, str(ROOT))

SEED_CHUNK = 10_000


def seed(state: Path, rows: int, database_url: str) -> None:
    """`rows` stored device keys on storage-key version 1, made as the S1SP path makes
    them (create, check value, wrap, seal in the HSM), written in chunks."""
    import datetime as dt

    from keysvc import config
    from keysvc.app import App
    from keysvc.custody import versions
    from keysvc.hsm import keys as hk
    from keysvc.records.stored_keys import StoredKey
    env = {"KEYSVC_DATABASE_URL": database_url, "KEYSVC_DEV": "on"} if database_url else {}
    app = App.open(config.load(env=env, state_dir=state))
    stored = app.records.device_keys
    now = dt.datetime.now(dt.timezone.utc)
    try:
        for start in range(0, rows, SEED_CHUNK):
            n = min(SEED_CHUNK, rows - start)

            def work(sess, start=start, n=n):
                sess.retire_after_use()
                version, label = versions.storage(sess)
                storage = hk.session_copy(sess, label)
                out = []
                for i in range(start, start + n):
                    obj = hk.create_session_key(sess, os.urandom(16), hk.PLAINTEXT_KEY_USAGE)
                    device = "-".join(f"{b:02X}" for b in (0x30 << 56 | i).to_bytes(8, "big"))
                    k = StoredKey(device, "AUTHENTICATION", "AuthenticationKey",
                                  "00-00-00-00-00-00-00-01", "MGEF-SEED", version,
                                  hk.check_value(obj), hk.wrap(storage, obj))
                    hk.destroy(obj)
                    out.append(k)
                return out
            sealed = stored.sealed(app.partitions.s1sp.run(work))
            with app.store.tx() as conn:
                stored.insert_many(conn, sealed, now)
    finally:
        app.close()


def _peak_rss_mib(pid: int) -> float:
    """The server's peak RSS plus its rewrap process's (keysvc-rewrap, a child)."""
    total = 0.0
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    for p in [pid, *[int(k) for k in kids.stdout.split()]]:
        try:
            if p != pid and Path(f"/proc/{p}/comm").read_text().strip() != "keysvc-rewrap":
                continue
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


def _clients(target: str, state: Path, one: dict, stop: threading.Event, n: int) -> Tally:
    from keysvc.api.v1 import keysvc_pb2 as pb
    from keysvc.client import connect
    tally = Tally()
    req = pb.VerifyPrepaymentKeyRequest(device_id=one["device"], expected_kcv=one["kcv"])

    def run() -> None:
        stub = connect(target, state, "s1sp").s1sp
        while not stop.is_set():
            tally.time(lambda: stub.VerifyPrepaymentKey(req, timeout=30))
            time.sleep(0.01)  # a steady load of live calls, not a flood
    threads = [threading.Thread(target=run, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    tally.threads = threads  # type: ignore[attr-defined]
    return tally


def _p99(latencies: list[float]) -> float:
    s = sorted(latencies)
    return s[min(len(s) - 1, int(len(s) * 0.99))] * 1000 if s else float("nan")


def _remaining(target: str, state: Path) -> tuple[int, int]:
    from keysvc.api.v1 import keysvc_pb2 as pb
    from keysvc.client import connect
    r = connect(target, state, "security-officer-1").admin.ListKeyVersions(
        pb.ListKeyVersionsRequest(partition="s1sp"))
    w = next(x for x in r.rewrap if x.partition == "s1sp")
    total = sum(v.stored_keys for v in r.versions if v.key == "storage-key")
    return w.remaining, total


def one_database(kind: str, rows: int, rate: float, clients: int, seconds: float,
                 batch: int = 250) -> dict:
    from keysvc.api.v1 import keysvc_pb2 as pb
    from keysvc.client import connect
    from tests.support import encoder
    work = Path(tempfile.mkdtemp(prefix=f"bench-rewrap-{kind}-"))
    state = work / "state"
    url = ""
    if kind == "postgresql":
        from tests.conftest import fresh_postgres_database
        url = fresh_postgres_database("bench_rewrap")
    env = {"KEYSVC_DATABASE_URL": url, "KEYSVC_DEV": "on"} if url else {}
    factory = encoder.DeviceCertificateFactory()
    (work / "ca").mkdir()
    (work / "ca" / "ca.pem").write_bytes(factory.ca_pem)
    state.mkdir()
    shutil.copytree(work / "ca", state / "trust-anchors")
    try:
        proc, target = start_serve(ROOT, state, env={**env,
                                                     "KEYSVC_REWRAP_ROWS_PER_SECOND": "0"})
        one = one_installation(target, state, factory, "RW")
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--seed", str(state), str(rows), url],
                       check=True, cwd=ROOT)
        seeded = time.perf_counter() - t
        if url:  # as a table in service is: vacuumed and analysed, not fresh from a bulk load
            import psycopg
            with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"),
                                 autocommit=True) as pg:
                pg.execute("VACUUM ANALYZE device_keys")
        # Without the job: the live calls' p99.
        proc, target = start_serve(ROOT, state, env={**env,
                                                     "KEYSVC_REWRAP_ROWS_PER_SECOND": "0"})
        stop = threading.Event()
        quiet = _clients(target, state, one, stop, clients)
        time.sleep(seconds)
        stop.set()
        for th in quiet.threads:  # type: ignore[attr-defined]
            th.join()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        # With the job: rotate, then the same calls until every row is moved.
        proc, target = start_serve(ROOT, state, env={**env, "KEYSVC_REWRAP_ROWS_PER_SECOND":
                                                     str(rate), "KEYSVC_REWRAP_BATCH":
                                                     str(batch)})
        o1, o2 = (connect(target, state, f"security-officer-{n}").admin for n in (1, 2))
        stop = threading.Event()
        busy = _clients(target, state, one, stop, clients)
        time.sleep(1)
        op = o1.RotateKey(pb.RotateKeyRequest(partition="s1sp", key="storage-key"))
        o2.ApproveOperation(pb.ApproveOperationRequest(operation_id=op.operation_id,
                                                       request_digest=op.request_digest))
        t0 = time.perf_counter()
        started = None
        while True:
            remaining, total = _remaining(target, state)
            if started is None and remaining < total:
                started = time.perf_counter()
            if remaining == 0:
                break
            # Each look counts the rows per version (a scan of the million-row index): every
            # 0.5 s only to see the job start and end, and every 2 s between, as `keysvc
            # admin rewrap-status --watch` does. Looking every 0.5 s throughout took the
            # PostgreSQL p99 during the rewrap from x1.79 to x2.6-2.85.
            near = started is None or remaining < rate * 3
            time.sleep(0.5 if near else 2.0)
        took = time.perf_counter() - (started or t0)
        stop.set()
        for th in busy.threads:  # type: ignore[attr-defined]
            th.join()
        rss = _peak_rss_mib(proc.pid)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        return {"database": kind, "rows": total, "seed_s": seeded, "rewrap_s": took,
                "rows_per_s": total / took, "peak_rss_mib": rss,
                "p99_quiet_ms": _p99(quiet.latencies), "p99_rewrap_ms": _p99(busy.latencies),
                "errors": len(quiet.errors) + len(busy.errors), "calls": len(busy.latencies)}
    except Exception:
        log = state / "server.log"
        lines = log.read_text().splitlines() if log.exists() else ["no server log"]
        first = [x for x in lines if '"WARNING"' in x or '"ERROR"' in x][:20]
        first += [x for x in lines if "Traceback" in x or "rror" in x and "call" not in x][:10]
        print("\n".join(first or lines[-40:]), file=sys.stderr)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--seed":
        seed(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "")
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rate", type=float, default=3300)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--batch", type=int, default=250, help="rows per rewrap transaction")
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--database", default="both", choices=["sqlite", "postgresql", "both"])
    a = ap.parse_args()
    kinds = ["sqlite", "postgresql"] if a.database == "both" else [a.database]
    if "postgresql" in kinds and not os.environ.get("KEYSVC_TEST_PG_URL"):
        print("no KEYSVC_TEST_PG_URL: PostgreSQL skipped (scripts/test-postgres start)")
        kinds.remove("postgresql")
    print(f"rewrap of {a.rows:,} stored device keys, job throttled to {a.rate:,.0f} rows/s "
          f"in batches of {a.batch}, "
          f"{a.clients} clients of VerifyPrepaymentKey")
    for kind in kinds:
        print(line(one_database(kind, a.rows, a.rate, a.clients, a.seconds, a.batch)),
              flush=True)


def line(r: dict) -> str:
    return (f"  {r['database']:<10} {r['rows']:>9,} rows in {r['rewrap_s']:7.1f} s = "
            f"{r['rows_per_s']:6,.0f} rows/s; peak RSS {r['peak_rss_mib']:5.0f} MiB; "
            f"p99 {r['p99_quiet_ms']:.1f} ms without, {r['p99_rewrap_ms']:.1f} ms during "
            f"(x{r['p99_rewrap_ms'] / r['p99_quiet_ms']:.2f}); {r['errors']} errors; "
            f"seeding took {r['seed_s']:.0f} s")


if __name__ == "__main__":
    main()
