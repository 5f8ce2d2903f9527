"""32 concurrent clients against one server for a bounded time: S1SP files, DCO files and
prepayment checks mixed. Reports throughput, p50/p99 latency, errors and lost results.

Every call must succeed and every file's result must be stored (checked at the end with a
second call of the same file, which must return the stored result). The server's HSM
wait is bounded, so an overloaded HSM shows as UNAVAILABLE errors here, never as a hang.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT

sys.path.insert(0, str(ROOT))


def run(clients: int = 32, seconds: float = 20.0, installations: int = 20) -> dict:
    import grpc

    from keysvc.api.v1 import keysvc_pb2 as pb
    from keysvc.client import error_reason
    from tests.serverproc import start_server
    from tests.support import encoder

    work = Path(tempfile.mkdtemp(prefix="keysvc-load-"))
    factory = encoder.DeviceCertificateFactory()
    (work / "ca.pem").write_bytes(factory.ca_pem)
    s1sp_kek, dco_kek = os.urandom(32), os.urandom(32)
    server = start_server(work / "server", trust_anchors=[work / "ca.pem"])
    server.import_aes_key("LOAD-S1SP", s1sp_kek, purpose="S1SP_TRANSPORT", owner_id="SMSO-L")
    server.import_aes_key("LOAD-DCO", dco_kek, purpose="DCO_TRANSPORT", owner_id="SMSO-L")
    counter = iter(range(10 ** 9))
    lock = threading.Lock()

    def new_file() -> tuple[bytes, str]:
        with lock:
            n = next(counter)
        installs = encoder.random_installations(installations, seed=10_000 + n,
                                                cert_factory=factory)
        return encoder.build_file(installs, file_id=f"LOAD-{n}", originator_id="SMSO-L",
                                  s1sp_key_name="LOAD-S1SP", s1sp_kek=s1sp_kek,
                                  dco_key_name="LOAD-DCO", dco_kek=dco_kek), installs[0].esme

    # A device with a stored prepayment key, for the prepayment checks.
    first, esme = new_file()
    first_result = server.as_("s1sp").s1sp.ProcessGroupInformation(
        pb.ProcessGroupInformationRequest(file=first))
    prepay_kcv = next(k.kcv for i in first_result.installations for k in i.keys
                      if k.device_id == esme and k.role == pb.PREPAYMENT)
    # Files are made before the clock starts, so the load is the server's alone.
    pool = [new_file()[0] for _ in range(clients * 3)]
    latencies: dict[str, list[float]] = {"s1sp": [], "dco": [], "prepay": []}
    errors: list[str] = []
    processed: list[bytes] = []
    deadline = time.monotonic() + seconds

    def client(i: int) -> None:
        s1sp = server.as_("s1sp").s1sp
        dco = server.as_("dco").dco
        k = 0
        while time.monotonic() < deadline:
            kind = ("s1sp", "dco", "prepay", "prepay")[(i + k) % 4]
            k += 1
            t = time.perf_counter()
            try:
                if kind == "prepay":
                    r = s1sp.VerifyPrepaymentKey(pb.VerifyPrepaymentKeyRequest(
                        device_id=esme, expected_kcv=prepay_kcv), timeout=60)
                    assert r.match
                else:
                    with lock:
                        data = pool.pop() if pool else None
                    if data is None:
                        kind = "prepay"
                        continue
                    if kind == "s1sp":
                        s1sp.ProcessGroupInformation(pb.ProcessGroupInformationRequest(
                            file=data), timeout=60)
                        with lock:
                            processed.append(data)
                    else:
                        dco.UnwrapMasterKeys(pb.UnwrapMasterKeysRequest(file=data),
                                             timeout=60)
            except grpc.RpcError as exc:
                with lock:
                    errors.append(f"{kind}: {exc.code().name} {error_reason(exc)}")
                continue
            with lock:
                latencies[kind].append(time.perf_counter() - t)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    elapsed = time.perf_counter() - started
    lost = 0
    for data in processed:  # every processed file's result must come back from storage
        r = server.as_("s1sp").s1sp.ProcessGroupInformation(
            pb.ProcessGroupInformationRequest(file=data))
        lost += r.accepted_count != installations
    assert server.stop() == 0
    all_lat = sorted(x for v in latencies.values() for x in v)

    def pct(xs: list[float], p: float) -> float:
        return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000 if xs else 0.0
    return {"clients": clients, "seconds": elapsed, "calls": len(all_lat),
            "throughput": len(all_lat) / elapsed, "p50_ms": pct(all_lat, 0.5),
            "p99_ms": pct(all_lat, 0.99), "errors": errors, "lost": lost,
            "per_kind": {k: (len(v), pct(sorted(v), 0.5), pct(sorted(v), 0.99))
                         for k, v in latencies.items()},
            "files_processed": len(processed)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20)
    args = ap.parse_args()
    r = run(args.clients, args.seconds)
    print(f"load: {r['clients']} clients for {r['seconds']:.1f}s: {r['calls']} calls, "
          f"{r['throughput']:.0f} calls/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms,"
          f" errors {len(r['errors'])}, lost results {r['lost']}")
    for kind, (n, p50, p99) in r["per_kind"].items():
        print(f"  {kind:7} {n:6} calls  p50 {p50:7.1f} ms  p99 {p99:7.1f} ms")
    for e in sorted(set(r["errors"]))[:10]:
        print("  error:", e)


if __name__ == "__main__":
    main()
