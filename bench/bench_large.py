"""Large files (issue 18): 10,000 and 30,000 installations and the largest EA file under
`max_file_bytes` (64 MiB, about 35,000 installations), through the running server, with the
peak resident memory of the whole service (the server and its certificate workers).

Peak memory: each process's VmHWM, reset before every file (/proc/PID/clear_refs), summed
over the server's process group. Targets for a 64 MiB file: <= 1 GiB for S1SP, <= 512 MiB
for DCO. Time per installation is printed beside it; the floor ratios are in bench_s1sp.py
and bench_dco.py.

    .venv/bin/python bench/bench_large.py [--sizes 10000,30000,35000]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT

sys.path.insert(0, str(ROOT))

MIB = 1024 * 1024


def _group(pgid: int) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.getpgid(int(p)) == pgid:
                    out.append(int(p))
            except (ProcessLookupError, PermissionError):
                continue
    return out


def _reset_peaks(pgid: int) -> None:
    for pid in _group(pgid):
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to VmRSS
        except OSError:
            pass


def _peak_mib(pgid: int) -> float:
    total = 0
    for pid in _group(pgid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def _server(work: Path, factory, keks: tuple[bytes, bytes]):
    from tests.serverproc import start_server
    server = start_server(work, trust_anchors=[work.parent / "ca.pem"])
    server.import_aes_key("LARGE-S1SP", keks[0], purpose="S1SP_TRANSPORT",
                          owner_id="SMSO-LARGE")
    server.import_aes_key("LARGE-DCO", keks[1], purpose="DCO_TRANSPORT", owner_id="SMSO-LARGE")
    return server


def _call(server, path: str, data: bytes) -> tuple[float, float, int]:
    """Seconds, peak MiB of the service during the call, accepted count."""
    from keysvc.api.v1 import keysvc_pb2 as pb
    _reset_peaks(server.proc.pid)
    t = time.perf_counter()
    if path == "s1sp":
        r = server.as_("s1sp").s1sp.ProcessGroupInformation(
            pb.ProcessGroupInformationRequest(file=data), timeout=900)
    else:
        r = server.as_("dco").dco.UnwrapMasterKeys(pb.UnwrapMasterKeysRequest(file=data),
                                                   timeout=900)
    return time.perf_counter() - t, _peak_mib(server.proc.pid), r.accepted_count


def run(sizes=(10_000, 30_000, 35_000)) -> list[dict]:
    """Each path on a server of its own (a fresh process: what the service needs for that
    file), then, for the largest file, DCO on the server that has just done S1SP (what
    the allocator keeps from one large call weighs on the next)."""
    from tests.support import encoder

    work = Path(tempfile.mkdtemp(prefix="keysvc-large-"))
    factory = encoder.DeviceCertificateFactory()
    (work / "ca.pem").write_bytes(factory.ca_pem)
    keks = (os.urandom(32), os.urandom(32))
    out = []
    for n in sizes:
        installs = encoder.random_installations(n, seed=n, cert_factory=factory)
        data = encoder.build_file(installs, file_id=f"LARGE-{n}", originator_id="SMSO-LARGE",
                                  s1sp_key_name="LARGE-S1SP", s1sp_kek=keks[0],
                                  dco_key_name="LARGE-DCO", dco_kek=keks[1])
        del installs
        row: dict = {"installations": n, "mib": len(data) / MIB}
        for path in ("s1sp", "dco"):
            server = _server(work / f"{path}-{n}", factory, keks)
            try:
                row[f"{path}_s"], row[f"{path}_peak_mib"], row[f"{path}_accepted"] = \
                    _call(server, path, data)
                if path == "s1sp" and n == max(sizes):
                    _, row["dco_after_s1sp_peak_mib"], _ = _call(server, "dco", data)
            finally:
                assert server.stop() == 0
        out.append(row)
        del data
    return out


HEADER = (f"{'installations':>13} {'file MiB':>8} {'S1SP s':>7} {'ms/inst':>7} "
          f"{'S1SP peak MiB':>13} {'DCO s':>6} {'ms/inst':>7} {'DCO peak MiB':>12}")


def line(r: dict) -> str:
    n = r["installations"]
    return (f"{n:>13} {r['mib']:>8.1f} {r['s1sp_s']:>7.1f} {1000 * r['s1sp_s'] / n:>7.3f} "
            f"{r['s1sp_peak_mib']:>13.0f} {r['dco_s']:>6.1f} {1000 * r['dco_s'] / n:>7.3f} "
            f"{r['dco_peak_mib']:>12.0f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,30000,35000")
    args = ap.parse_args()
    print("Large files, EA (targets at 64 MiB: S1SP <= 1024 MiB, DCO <= 512 MiB)")
    print(HEADER)
    rows = run(tuple(int(x) for x in args.sizes.split(",")))
    for r in rows:
        print(line(r))
    print(f"  DCO on the server that has just done S1SP ({rows[-1]['installations']}): peak "
          f"{rows[-1]['dco_after_s1sp_peak_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
