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
    from hsm import Token, TokenConfig
    return Token(TokenConfig(settings.pkcs11_module, settings.token_label("s1sp"),
                             settings.pin("s1sp"), pool_size=2))
