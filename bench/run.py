"""Run every benchmark and print the ratios against their in-run baselines.

    make bench            # or: .venv/bin/python bench/run.py [--quick]

Ratios, not absolute times, are the numbers to compare between machines and runs: each
baseline is measured in the same run on the same kind of SoftHSM2 token.

"ratio" is server time over the issues' baseline (the HSM work through python-pkcs11);
"to floor" is server time over the same HSM work made the server's way (bench_s1sp.py),
i.e. what the service costs on top of the fastest HSM loop.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_audit  # noqa: E402
import bench_cores  # noqa: E402
import bench_dco  # noqa: E402
import bench_large  # noqa: E402
import bench_load  # noqa: E402
import bench_rewrap  # noqa: E402
import bench_s1sp  # noqa: E402
import bench_seal  # noqa: E402
import bench_store_lock  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller runs (a smoke check)")
    args = ap.parse_args()
    print("== S1SP ProcessGroupInformation, EA files, best of 5 (targets: ratio <= 1.2 at 1,000;"
          " >= 500 installations/s; to floor <= 2.0 at 1,000 and 20,000)")
    print(bench_s1sp.HEADER)
    for r in bench_s1sp.run(sizes=(1, 100) if args.quick else (1, 100, 1000, 20000),
                            repeats=3 if args.quick else 5):
        print(bench_s1sp.line(r))
    print("== DCO UnwrapMasterKeys, best of 5 (targets: ratio <= 1.0; to floor <= 1.8 at 1,000 "
          "and 20,000)")
    for n in (100,) if args.quick else (1000, 20000):
        print(bench_dco.line(bench_dco.run(n=n)))
    print("== Large files: time and peak memory of the whole service")
    print(bench_large.HEADER)
    rows = bench_large.run((2000, 5000) if args.quick else (10_000, 30_000, 35_000))
    for r in rows:
        print(bench_large.line(r))
    print(f"  DCO on the server that has just done S1SP ({rows[-1]['installations']}): peak "
          f"{rows[-1]['dco_after_s1sp_peak_mib']:.0f} MiB")
    print("== Every core: 64 clients of audited small calls, 1 process and one per core "
          "(targets: >= 1,000 calls/s, p99 <= 100 ms, >= 1.7x one client, 0 errors)")
    for r in bench_cores.run(64, 5 if args.quick else 20, max(2, os.cpu_count() or 2)):
        print(bench_cores.line(r))
    print("== Sealing stored keys: an HMAC per row against one MAC per batch (1,000 "
          "installations' rows)")
    print(bench_seal.line(bench_seal.run()))
    print("== SoftHSM2's file store, two processes: token writes while another searches")
    for r in bench_store_lock.run(3 if args.quick else 10):
        print(bench_store_lock.line(r))
    print("== Load: 32 clients, mixed")
    r = bench_load.run(seconds=5 if args.quick else 20)
    print(f"{r['calls']} calls in {r['seconds']:.1f}s: {r['throughput']:.0f} calls/s, "
          f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, errors {len(r['errors'])}, "
          f"lost {r['lost']}")
    print(f"== Audit: 64 clients of small calls against the baseline {bench_audit.BASELINE_REV}"
          " (fail-open auditing) in the same run (target: throughput ratio >= 1.0, p99 ratio "
          "<= 1.0, events = calls)")
    a = bench_audit.run(seconds=5 if args.quick else 30)
    print(bench_audit.line("baseline", a["baseline"]))
    print(bench_audit.line("now", a["now"]))
    print(f"  throughput ratio {a['throughput_ratio']:.2f}, p99 ratio {a['p99_ratio']:.2f}")
    rows = 20_000 if args.quick else 1_000_000
    print(f"== Rewrap of {rows:,} stored device keys to a new storage-key version, with and "
          "without it in the same run (targets: >= 3,000 rows/s, live p99 at most doubled)")
    kinds = ["sqlite"] + (["postgresql"] if os.environ.get("KEYSVC_TEST_PG_URL") else [])
    for kind in kinds:
        print(bench_rewrap.line(bench_rewrap.one_database(kind, rows, 3300, 4, 15)))


if __name__ == "__main__":
    main()
