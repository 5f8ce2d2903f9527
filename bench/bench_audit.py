"""Auditing costs little (issue 14): 64 concurrent clients of small calls (VerifyPrepaymentKey,
VerifyMasterKey, GetKey) for 30 s, against this checkout and, in the same run, against a
baseline checkout (default: the commit before fail-closed auditing, where an event was
appended after the call, in its own transaction, and its failure ignored).

Reports throughput, p50/p99, errors, and events = calls (every call has its event in the
chain). The ratios are this checkout over the baseline: throughput >= 1.0 and p99 <= 1.0
are the targets.

    .venv/bin/python bench/bench_audit.py [--seconds 30] [--clients 64] [--baseline REV]
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

from common import ROOT, Tally, audit_events, one_installation, start_serve

sys.path.insert(0, str(ROOT))

BASELINE_REV = "cb89190"  # main before issue 14 (session 3's last commit)
ACTIONS = ("keysvc.v1.S1SPService/VerifyPrepaymentKey", "keysvc.v1.DCOService/VerifyMasterKey",
           "keysvc.v1.KeyAdministrationService/GetKey")


def _checkout(rev: str) -> Path:
    """A work tree of `rev` with its generated protobuf code."""
    where = Path(tempfile.mkdtemp(prefix="keysvc-base-")) / "src"
    subprocess.run(["git", "worktree", "add", "--detach", "-f", str(where), rev], cwd=ROOT,
                   check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iprotos", "--python_out=.",
                    "--grpc_python_out=.", "protos/keysvc/api/v1/keysvc.proto"], cwd=where,
                   check=True, capture_output=True)
    return where


def _start(src: Path, state: Path) -> tuple[subprocess.Popen, str]:
    return start_serve(src, state)


def _events(state: Path) -> int:
    return audit_events(state, ACTIONS)


def measure(src: Path, clients: int, seconds: float) -> dict:
    from keysvc.api.v1 import keysvc_pb2 as pb
    from keysvc.client import connect
    from tests.support import encoder

    work = Path(tempfile.mkdtemp(prefix="keysvc-audit-bench-"))
    state = work / "state"
    factory = encoder.DeviceCertificateFactory()
    (state / "trust-anchors").mkdir(parents=True)
    (state / "trust-anchors" / "ca.pem").write_bytes(factory.ca_pem)
    proc, target = _start(src, state)
    try:
        calls = one_installation(target, state, factory, "AB")
        esme, prepay = calls["device"], calls["kcv"]
        mk_device, mk_kcv = calls["mk_device"], calls["mk_kcv"]
        before = _events(state)
        tally = Tally()
        deadline = time.monotonic() + seconds

        def client(i: int) -> None:
            # Each client its own channel, as 64 separate callers would have.
            c_s1sp = connect(target, state, "s1sp").s1sp
            c_dco = connect(target, state, "dco").dco
            c_adm = connect(target, state, "security-officer-1").admin
            k = i
            while time.monotonic() < deadline:
                k += 1
                if k % 3 == 0:
                    tally.time(lambda: c_s1sp.VerifyPrepaymentKey(pb.VerifyPrepaymentKeyRequest(
                        device_id=esme, expected_kcv=prepay), timeout=30))
                elif k % 3 == 1:
                    tally.time(lambda: c_dco.VerifyMasterKey(pb.VerifyMasterKeyRequest(
                        device_id=mk_device, expected_kcv=mk_kcv), timeout=30))
                else:
                    tally.time(lambda: c_adm.GetKey(pb.GetKeyRequest(name="AB-S1SP"),
                                                    timeout=30))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        started = time.perf_counter()
        [t.start() for t in threads]
        [t.join() for t in threads]
        elapsed = time.perf_counter() - started
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    events = _events(state) - before
    lat, errors = sorted(tally.latencies), tally.errors

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else 0.0
    shutil.rmtree(work, ignore_errors=True)
    return {"calls": len(lat), "errors": errors, "throughput": len(lat) / elapsed,
            "p50_ms": pct(0.5), "p99_ms": pct(0.99), "events": events,
            "calls_made": len(lat) + len(errors)}


def run(clients: int = 64, seconds: float = 30.0, baseline: str = BASELINE_REV) -> dict:
    base_src = _checkout(baseline)
    try:
        base = measure(base_src, clients, seconds)
        now = measure(ROOT, clients, seconds)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base_src)], cwd=ROOT,
                       capture_output=True)
    return {"baseline": base, "now": now,
            "throughput_ratio": now["throughput"] / base["throughput"],
            "p99_ratio": now["p99_ms"] / base["p99_ms"] if base["p99_ms"] else 0.0}


def line(name: str, r: dict) -> str:
    return (f"  {name:9} {r['throughput']:6.0f} calls/s  p50 {r['p50_ms']:6.1f} ms  "
            f"p99 {r['p99_ms']:6.1f} ms  errors {len(r['errors'])}  "
            f"events {r['events']} / calls {r['calls_made']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--baseline", default=BASELINE_REV)
    args = ap.parse_args()
    r = run(args.clients, args.seconds, args.baseline)
    print(f"audit: {args.clients} clients, {args.seconds:g} s, small calls")
    print(line(f"baseline {args.baseline}", r["baseline"]))
    print(line("now", r["now"]))
    print(f"  throughput ratio {r['throughput_ratio']:.2f} (target >= 1.0), "
          f"p99 ratio {r['p99_ratio']:.2f} (target <= 1.0)")


if __name__ == "__main__":
    main()
