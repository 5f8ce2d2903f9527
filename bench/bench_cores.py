"""Every core (issue 18): small audited calls from many clients, one server process against
several behind one port (`keysvc serve --processes N`), in the same run.

The calls are VerifyPrepaymentKey and VerifyMasterKey, alternating; each is audited (its
event chained in the database and in the audit file before it returns). The clients are
threads in separate client processes (so that the load generator's own GIL is not the
limit), each thread with its own channel: a connection stays with one server process, so
load spreads over connections. The client processes share the machine's cores with the
server; the figures are what this machine does with both on it.

Targets (2 cores): with 64 clients, >= 1,000 calls/s, p99 <= 100 ms, >= 1.7x the
throughput of 1 client, 0 errors, audit events = calls.

Beside each 64-client figure: the CPU each call cost the server (all its processes) and the
clients, the server's context switches a call, and the *transport floor*: the same clients
calling the unaudited health check of the same server (gRPC, mTLS and the interceptor,
nothing else), which is as far as these calls could go on this machine.

    .venv/bin/python bench/bench_cores.py [--seconds 20] [--clients 64] [--processes 2]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
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
from tests.serverproc import free_port  # noqa: E402

ACTIONS = ("keysvc.v1.S1SPService/VerifyPrepaymentKey", "keysvc.v1.DCOService/VerifyMasterKey")
CLIENT_PROCESSES = 4


def _start(state: Path, processes: int, metrics: int) -> tuple[subprocess.Popen, str]:
    return start_serve(ROOT, state, "--processes", str(processes),
                       env={"KEYSVC_METRICS_LISTEN": f"127.0.0.1:{metrics}"})


def _batches(metrics: int, processes: int) -> tuple[float, float]:
    """Audit batches written and the events they held so far, over every worker (worker i
    serves its metrics on the port + i): how well the writers group the calls' events."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    batches = events = 0.0
    for i in range(processes):
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics + i}/metrics",
                                      timeout=10).read().decode()
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name == "keysvc_audit_batch_events_count":
                    batches += sample.value
                elif sample.name == "keysvc_audit_batch_events_sum":
                    events += sample.value
    return batches, events


def _events(state: Path) -> int:
    return audit_events(state, ACTIONS)


def _client_process(target: str, state: str, calls: dict, threads: int, seconds: float,
                    out: "mp.Queue") -> None:
    """`threads` clients, each with its own channels, until the deadline. `calls` empty:
    health checks (the transport floor)."""
    sys.path.insert(0, str(ROOT))
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from keysvc.api.v1 import keysvc_pb2 as pb
    from keysvc.client import connect

    tally = Tally()
    stubs = [(connect(target, Path(state), "s1sp").s1sp, connect(target, Path(state), "dco").dco)
             for _ in range(threads)]
    health = [health_pb2_grpc.HealthStub(connect(target, Path(state), "s1sp").channel)
              for _ in range(threads)] if not calls else []
    for s1sp, dco in stubs:  # connected (TLS handshakes done) before the clock starts
        if calls:
            dco.VerifyMasterKey(pb.VerifyMasterKeyRequest(device_id=calls["mk_device"],
                                                          expected_kcv=calls["mk_kcv"]))
    for h in health:
        h.Check(health_pb2.HealthCheckRequest())
    start = time.monotonic() + 0.5
    deadline = start + seconds

    def client(i: int) -> None:
        s1sp, dco = stubs[i]
        k = i
        time.sleep(max(0.0, start - time.monotonic()))
        while time.monotonic() < deadline:
            k += 1
            if not calls:
                tally.time(lambda: health[i].Check(health_pb2.HealthCheckRequest(), timeout=30))
            elif k % 2:
                tally.time(lambda: s1sp.VerifyPrepaymentKey(pb.VerifyPrepaymentKeyRequest(
                    device_id=calls["device"], expected_kcv=calls["kcv"]), timeout=30))
            else:
                tally.time(lambda: dco.VerifyMasterKey(pb.VerifyMasterKeyRequest(
                    device_id=calls["mk_device"], expected_kcv=calls["mk_kcv"]), timeout=30))

    ts = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    out.put((tally.latencies, tally.errors))


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes so far (a process gone counts nothing)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def _switches(pids: list[int]) -> int:
    """Context switches (voluntary and not) of every thread of these processes so far: each
    is a hand-over of the GIL, a lock or the CPU, the cost session 15 found most between
    an audited call (~33 in a worker) and the health check (~14)."""
    total = 0
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                for row in (task / "status").read_text().splitlines():
                    name, _, value = row.partition(":")
                    if name.endswith("ctxt_switches"):  # voluntary_ and nonvoluntary_
                        total += int(value)
            except (OSError, ValueError):
                pass
    return total


def _server_pids(proc: subprocess.Popen) -> list[int]:
    kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    return [proc.pid, *[int(k) for k in kids.stdout.split()]]


def _load(target: str, state: Path, calls: dict, clients: int, seconds: float,
          server: list[int] = (), metrics: tuple[int, int] | None = None) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = min(CLIENT_PROCESSES, clients)
    per = [clients // procs + (i < clients % procs) for i in range(procs)]
    before = _events(state)
    cpu_before, mine_before = _cpu_seconds(server), os.times()
    switches_before = _switches(server)
    batches_before = _batches(*metrics) if metrics else (0.0, 0.0)
    ps = [ctx.Process(target=_client_process, args=(target, str(state), calls, n, seconds, out))
          for n in per]
    [p.start() for p in ps]
    lat: list[float] = []
    errors: list[str] = []
    for _ in ps:
        got_lat, got_err = out.get()
        lat += got_lat
        errors += got_err
    [p.join() for p in ps]
    mine = os.times()
    server_cpu = _cpu_seconds(server) - cpu_before  # (clients' set-up included: a bound)
    switches = _switches(server) - switches_before
    client_cpu = (mine.children_user + mine.children_system
                  - mine_before.children_user - mine_before.children_system)
    time.sleep(0.5)
    events = _events(state) - before - clients  # (less one warm-up call per client)
    batches_after = _batches(*metrics) if metrics else (0.0, 0.0)
    batches = batches_after[0] - batches_before[0]
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else 0.0
    return {"clients": clients, "calls": len(lat), "errors": errors,
            "throughput": len(lat) / seconds, "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "events": events, "calls_made": len(lat) + len(errors),
            "server_ms": server_cpu * 1000 / max(1, len(lat)),
            "client_ms": client_cpu * 1000 / max(1, len(lat)),
            "switches": switches / max(1, len(lat)),
            "per_batch": (batches_after[1] - batches_before[1]) / batches if batches else 0.0}


def measure(processes: int, clients: int, seconds: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix="keysvc-cores-"))
    state = work / "state"
    (state / "trust-anchors").mkdir(parents=True)
    from tests.support import encoder
    factory = encoder.DeviceCertificateFactory()
    (state / "trust-anchors" / "ca.pem").write_bytes(factory.ca_pem)
    metrics = free_port()  # (and the next processes - 1 ports, one a worker)
    proc, target = _start(state, processes, metrics)
    try:
        calls = one_installation(target, state, factory, "CORES")
        pids = _server_pids(proc)
        one = _load(target, state, calls, 1, seconds)
        many = _load(target, state, calls, clients, seconds, pids, (metrics, processes))
        floor = _load(target, state, {}, clients, seconds, pids)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(60)
    if one["errors"] or many["errors"]:
        print(f"    (errors: the server's state and log are kept in {state})")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return {"processes": processes, "one": one, "many": many, "floor": floor, "rc": rc,
            "scaling": many["throughput"] / one["throughput"] if one["throughput"] else 0.0}


def line(r: dict) -> str:
    m, o, f = r["many"], r["one"], r["floor"]
    return (f"  {r['processes']} process{'es' if r['processes'] > 1 else '  '}: 1 client "
            f"{o['throughput']:5.0f} calls/s; {m['clients']} clients {m['throughput']:5.0f} "
            f"calls/s, p50 {m['p50_ms']:5.1f} ms, p99 {m['p99_ms']:6.1f} ms, x{r['scaling']:.2f} "
            f"of 1 client, errors {len(m['errors']) + len(o['errors'])}, events "
            f"{m['events'] + o['events']} / calls {m['calls_made'] + o['calls_made']}\n"
            f"               a call: server {m['server_ms']:.2f} ms CPU and {m['switches']:.0f} "
            f"context switches, {m['per_batch']:.1f} events an audit batch, clients "
            f"{m['client_ms']:.2f} ms CPU; transport floor "
            f"(unaudited health checks) {f['throughput']:5.0f} calls/s (server "
            f"{f['server_ms']:.2f} ms and {f['switches']:.0f}, clients {f['client_ms']:.2f} "
            f"ms a call), errors {len(f['errors'])}")


def run(clients: int = 64, seconds: float = 20.0, processes: int = 2) -> list[dict]:
    return [measure(1, clients, seconds), measure(processes, clients, seconds)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    print(f"cores: VerifyPrepaymentKey + VerifyMasterKey, audited, {args.seconds:g} s each "
          f"({os.cpu_count()} cores)")
    for r in run(args.clients, args.seconds, args.processes):
        print(line(r))
        for e in sorted(set(r["many"]["errors"]))[:5]:
            print("    error:", e)


if __name__ == "__main__":
    main()
