"""UnwrapMasterKeys of 1,000 entries through the server vs C_UnwrapKey + C_WrapKey in-process.

Baseline (same run, same kind of SoftHSM2 token, python-pkcs11): for each entry, unwrap
the master key under the DCO transport key into a session object, wrap it under a storage
key, destroy it. Floor (same run): the HSM work the service cannot avoid, made the fastest
way we know: session copies of both keys, then per entry direct C_UnwrapKey, C_WrapKey and
the CMAC check value, the object destroyed; see bench_s1sp.py.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from common import ROOT, baseline_token, bench_server, best_of_each
from cryptography.hazmat.primitives.keywrap import aes_key_wrap


def run(n: int = 1000, repeats: int = 5) -> dict:
    from keysvc.api.v1 import keysvc_pb2 as pb
    from keysvc.hsm import keys as hk
    from tests.support import encoder

    work = Path(tempfile.mkdtemp(prefix="keysvc-bench-dco-"))
    server, s1sp_kek, dco_kek = bench_server(work)
    try:
        stub = server.as_("dco").dco
        files, masters = [], []
        for r in range(repeats):
            installs = encoder.random_installations(n, group="EA", seed=7000 + r)
            masters = [i.master_key for i in installs]
            files.append(encoder.build_file(
                installs, group_id="EA", file_id=f"BENCH-DCO-{r}", originator_id="SMSO-BENCH",
                s1sp_key_name="BENCH-S1SP", s1sp_kek=s1sp_kek, dco_key_name="BENCH-DCO",
                dco_kek=dco_kek))
        wrapped = [aes_key_wrap(dco_kek, m) for m in masters]
        token = baseline_token(work / "baseline")
        with token.session() as s:
            if not hk.has_key(s, "bench-storage"):
                hk.generate_aes(s, "bench-storage")

        def baseline() -> None:
            with token.session() as s:
                kek = hk.create_aes(s, dco_kek, usage=hk.KEK_USAGE)
                storage = hk.find_key(s, "bench-storage")
                for w in wrapped:
                    obj = hk.unwrap(s, kek, w, hk.Unwrap.AES_KW, usage=hk.DEVICE_USAGE)
                    hk.wrap(storage, obj)
                    hk.destroy(obj)
                hk.destroy(kek)

        def floor() -> None:
            with token.session() as s:
                s.retire_after_use()
                kek = hk.create_aes(s, dco_kek, usage=hk.KEK_USAGE)
                storage = hk.session_copy(s, "bench-storage")
                for w in wrapped:
                    obj = hk.unwrap_session_key(s, kek, w, hk.Unwrap.AES_KW, hk.DEVICE_USAGE)
                    hk.wrap(storage, obj)
                    hk.check_value(obj)
                    hk.destroy(obj)

        it = iter(files)

        def through_server() -> None:
            r = stub.UnwrapMasterKeys(pb.UnwrapMasterKeysRequest(file=next(it)))
            assert r.accepted_count == n, r.entries[0].problems

        t_base, t_floor, t_server = best_of_each(repeats, baseline, floor, through_server)
        return {"entries": n, "server_per_s": n / t_server, "baseline_per_s": n / t_base,
                "ratio": t_server / t_base, "floor_per_s": n / t_floor,
                "floor_ratio": t_server / t_floor}
    finally:
        assert server.stop() == 0


def main() -> None:
    r = run()
    print("DCO UnwrapMasterKeys, best of 5")
    print(line(r))


def line(r: dict) -> str:
    return (f"{r['entries']} entries: server {r['server_per_s']:.0f}/s, baseline "
            f"{r['baseline_per_s']:.0f}/s, ratio {r['ratio']:.2f}; floor "
            f"{r['floor_per_s']:.0f}/s, server to floor {r['floor_ratio']:.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
