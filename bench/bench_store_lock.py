"""Two processes on one SoftHSM2 token, with and without the store lock (keysvc/hsm/store_lock.py).

    .venv/bin/python bench/bench_store_lock.py [seconds]

One process makes token keys and data objects (and destroys most), the other searches,
both through keysvc.hsm (tests/support/store_race.py). Without the lock SoftHSM2 2.6.1
fails some searches and spoils some new keys (empty label, no value); with it neither
happens, and the cost shows as the rates of both sides, in the same run.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_hsm_store_lock import race, race_token  # noqa: E402


def run(seconds: float = 10.0) -> list[dict]:
    out = []
    for mode in ("nolock", "lock"):
        with tempfile.TemporaryDirectory() as d:
            searched, created, token = race(race_token(Path(d)), seconds,
                                            *(["nolock"] if mode == "nolock" else []))
        kept = set(created["kept"])
        spoiled = sum(len(sizes) for label, sizes in token["keys"].items() if label not in kept) \
            + token["unlabelled_data"]
        out.append({"mode": mode, "searches_per_s": searched["searches"] / seconds,
                    "search_failures": sum(searched["failures"].values()),
                    "keys_per_s": created["made"] / seconds,
                    "create_failures": sum(created["failures"].values()),
                    "unreadable": created["unreadable"], "spoiled_left": spoiled})
    return out


def line(r: dict) -> str:
    return (f"  {r['mode']:>6}: {r['searches_per_s']:7.0f} searches/s "
            f"({r['search_failures']} failed), {r['keys_per_s']:5.0f} key+data pairs/s "
            f"({r['create_failures']} failed, {r['unreadable']} unreadable at once, "
            f"{r['spoiled_left']} spoiled objects left)")


if __name__ == "__main__":
    for r in run(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0):
        print(line(r))
