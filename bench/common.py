"""Shared set-up for the benchmarks: a real server, a baseline token, generated files."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keysvc import config  # noqa: E402
from keysvc.devstate import ensure_dev_state, point_softhsm_at  # noqa: E402


def best_of(n: int, fn) -> float:
    """Best wall time of n runs: the least noisy estimate on a shared machine."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def best_of_each(n: int, *fns) -> list[float]:
    """Best wall time of each function over n rounds, the functions taking turns within a
    round: a slow spell of this shared machine then costs every one of them a round, not
    one of them all its runs (a floor measured in such a spell moved a ratio by 0.9)."""
    best = [float("inf")] * len(fns)
    for _ in range(n):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def bench_server(work: Path, trust_anchors: list[Path] = ()):
    """A real server with the two transport keys the benchmark files are made for."""
    from tests.serverproc import start_server
    s1sp_kek, dco_kek = os.urandom(32), os.urandom(32)
    server = start_server(work / "server", trust_anchors=list(trust_anchors))
    server.import_aes_key("BENCH-S1SP", s1sp_kek, purpose="S1SP_TRANSPORT",
                          owner_id="SMSO-BENCH")
    server.import_aes_key("BENCH-DCO", dco_kek, purpose="DCO_TRANSPORT", owner_id="SMSO-BENCH")
    return server, s1sp_kek, dco_kek


def baseline_token(state: Path):
    """A SoftHSM2 token of the same kind as the server's, opened in this process."""
    settings = config.load(env={}, state_dir=state)
    ensure_dev_state(settings)
    point_softhsm_at(settings)
    from keysvc.hsm import Token, TokenConfig
    return Token(TokenConfig(settings.pkcs11_module, settings.token_label("s1sp"),
                             settings.pin("s1sp"), pool_size=2))


def start_serve(src: Path, state: Path, *extra: str, env: dict | None = None):
    """`keysvc serve` of the checkout `src` on `state`, as its own process group; returns
    the process and its address once it says it listens. `env`: settings (KEYSVC_...)."""
    import subprocess

    from tests.serverproc import free_port
    port = free_port()
    state.mkdir(parents=True, exist_ok=True)
    log = open(state / "server.log", "wb")
    extra_env = env
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYSVC_")
           and k != "SOFTHSM2_CONF"}
    env = {**env, **(extra_env or {})}
    env["PYTHONPATH"] = str(src)
    proc = subprocess.Popen([sys.executable, "-m", "keysvc.cli", "serve", "--state-dir",
                             str(state), "--listen", f"127.0.0.1:{port}", *extra], cwd=src,
                            env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while b"listening on" not in (state / "server.log").read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((state / "server.log").read_text()[-3000:])
        time.sleep(0.1)
    return proc, f"127.0.0.1:{port}"


def audit_events(state: Path, actions: tuple[str, ...]) -> int:
    """Events of these actions in the server's SQLite chain."""
    import sqlite3
    db = sqlite3.connect(state / "keysvc.db")
    try:
        return db.execute(f"SELECT count(*) FROM audit_events WHERE action IN "
                          f"({','.join('?' * len(actions))})", actions).fetchone()[0]
    finally:
        db.close()


def one_installation(target: str, state: Path, factory, tag: str) -> dict:
    """Transport keys `tag`-S1SP and `tag`-DCO imported under dual control (two officers)
    and one EA installation stored by both paths: what the small-call benchmarks verify."""
    from cryptography.hazmat.primitives import serialization

    from keysvc.api.v1 import keysvc_pb2 as pb
    from keysvc.client import connect
    from tests.serverproc import OAEP
    from tests.support import encoder

    o1, o2 = (connect(target, state, f"security-officer-{n}").admin for n in (1, 2))
    keks = {}
    for name, purpose in ((f"{tag}-S1SP", pb.S1SP_TRANSPORT), (f"{tag}-DCO", pb.DCO_TRANSPORT)):
        key = os.urandom(32)
        job = o1.CreateImportJob(pb.CreateImportJobRequest(name=f"job {name}", purpose=purpose))
        wrapped = serialization.load_pem_public_key(job.public_key_pem.encode()).encrypt(
            key, OAEP)
        op = o1.ImportTransportKey(pb.ImportTransportKeyRequest(
            name=name, purpose=purpose, owner_id=f"SMSO-{tag}", owner_type=pb.SMSO,
            expected_kcv=encoder.kcv(key), wrapped_key=wrapped, import_job_id=job.import_job_id))
        o2.ApproveOperation(pb.ApproveOperationRequest(operation_id=op.operation_id,
                                                       request_digest=op.request_digest))
        keks[name] = key
    installs = encoder.random_installations(1, seed=18, cert_factory=factory)
    data = encoder.build_file(installs, file_id=f"MGEF-{tag}-1", originator_id=f"SMSO-{tag}",
                              s1sp_key_name=f"{tag}-S1SP", s1sp_kek=keks[f"{tag}-S1SP"],
                              dco_key_name=f"{tag}-DCO", dco_kek=keks[f"{tag}-DCO"])
    s1sp, dco = connect(target, state, "s1sp").s1sp, connect(target, state, "dco").dco
    r = s1sp.ProcessGroupInformation(pb.ProcessGroupInformationRequest(file=data))
    key = next(k for k in r.installations[0].keys if k.role == pb.PREPAYMENT)
    m = dco.UnwrapMasterKeys(pb.UnwrapMasterKeysRequest(file=data)).entries[0]
    return {"device": key.device_id, "kcv": key.kcv, "mk_device": m.device_id,
            "mk_kcv": m.kcv, "key_name": f"{tag}-S1SP"}


class Tally:
    """Latencies and errors of many client threads."""

    def __init__(self) -> None:
        import threading
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def time(self, call) -> None:
        """Make the call; its latency, or its error's code and reason, is kept."""
        import grpc

        from keysvc.client import error_reason
        t = time.perf_counter()
        try:
            call()
        except grpc.RpcError as exc:
            with self._lock:
                self.errors.append(f"{exc.code().name} {error_reason(exc)}")
            return
        with self._lock:
            self.latencies.append(time.perf_counter() - t)
