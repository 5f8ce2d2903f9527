"""ProcessGroupInformation through the running server vs the bare HSM work in-process.

Baseline (same run, same kind of SoftHSM2 token, python-pkcs11): unwrap the content key,
AES-GCM decrypt, then for every device key create a session object, wrap it under a storage
key and destroy it. The server does that plus parsing, schema validation, certificate
verification, check values, the database transaction and mTLS.

Floor (same run): the HSM work the service cannot avoid, made the fastest way we know - a
session copy of the storage key, then per device key direct C_CreateObject, its CMAC check
value (the KCV every result returns) and C_WrapKey (keysvc/hsm/direct.py), each object destroyed
after use (cheaper than keeping it). The server beats the python-pkcs11 baseline because of
those calls; its ratio to the floor is what the service itself (parsing, validation,
certificates, row seals, database, gRPC) costs on top of that loop.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from common import ROOT, baseline_token, bench_server, best_of_each
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap


def run(sizes=(1, 100, 1000), repeats: int = 5) -> list[dict]:
    from keysvc.api.v1 import keysvc_pb2 as pb
    from keysvc.hsm import keys as hk
    from tests.support import encoder

    work = Path(tempfile.mkdtemp(prefix="keysvc-bench-"))
    factory = encoder.DeviceCertificateFactory()
    ca = work / "device-ca.pem"
    ca.write_bytes(factory.ca_pem)
    server, s1sp_kek, dco_kek = bench_server(work, [ca])
    try:
        stub = server.as_("s1sp").s1sp
        token = baseline_token(work / "baseline")
        with token.session() as s:
            if not hk.has_key(s, "bench-storage"):
                hk.generate_aes(s, "bench-storage")
        results = []
        counter = [0]
        for n in sizes:
            batches = [encoder.random_installations(n, group="EA", seed=n * 100 + r,
                                                    cert_factory=factory)
                       for r in range(repeats)]
            installs = batches[0]
            plaintext = encoder.plaintext_xml("EA", installs)
            keys = [k for i in installs for k in (i.auth_key, i.enc_key, i.prepay_key,
                                                   i.gsme_prepay_key) if k]

            def make_file(installs) -> bytes:
                counter[0] += 1
                return encoder.build_file(installs, group_id="EA",
                                          file_id=f"BENCH-{n}-{counter[0]}",
                                          originator_id="SMSO-BENCH",
                                          s1sp_key_name="BENCH-S1SP", s1sp_kek=s1sp_kek,
                                          dco_key_name="BENCH-DCO", dco_kek=dco_kek)
            files = [make_file(b) for b in batches]
            it = iter(files)

            def through_server() -> None:
                r = stub.ProcessGroupInformation(pb.ProcessGroupInformationRequest(
                    file=next(it)))
                assert r.accepted_count == n, r.installations[0].problems

            # The baseline: the same HSM work, no service around it.
            content_key = os.urandom(32)
            iv = os.urandom(12)
            wrapped_ck = aes_key_wrap(s1sp_kek, content_key)
            ct = AESGCM(content_key).encrypt(iv, plaintext, None)

            def decrypt(s) -> None:
                kek = hk.create_aes(s, s1sp_kek, usage=hk.KEK_USAGE)
                ck = hk.unwrap(s, kek, wrapped_ck, hk.Unwrap.AES_KW, usage=hk.CONTENT_USAGE)
                hk.gcm_decrypt(ck, iv, ct)
                hk.destroy(ck)
                hk.destroy(kek)

            def baseline() -> None:
                with token.session() as s:
                    decrypt(s)
                    storage = hk.find_key(s, "bench-storage")
                    for k in keys:
                        obj = hk.create_aes(s, k, usage=hk.DEVICE_USAGE)
                        hk.wrap(storage, obj)
                        hk.destroy(obj)

            def floor() -> None:
                with token.session() as s:
                    s.retire_after_use()
                    decrypt(s)
                    storage = hk.session_copy(s, "bench-storage")
                    for k in keys:
                        obj = hk.create_session_key(s, k, hk.PLAINTEXT_KEY_USAGE)
                        hk.check_value(obj)
                        hk.wrap(storage, obj)
                        hk.destroy(obj)

            t_base, t_floor, t_server = best_of_each(repeats, baseline, floor, through_server)
            results.append({"installations": n, "server_s": t_server, "baseline_s": t_base,
                            "server_per_s": n / t_server, "baseline_per_s": n / t_base,
                            "ratio": t_server / t_base, "floor_per_s": n / t_floor,
                            "floor_ratio": t_server / t_floor})
        return results
    finally:
        rc = server.stop()
        assert rc == 0, rc


HEADER = (f"{'installations':>13} {'server inst/s':>14} {'baseline inst/s':>16} {'ratio':>6}"
          f" {'floor inst/s':>13} {'to floor':>9}")


def line(r: dict) -> str:
    return (f"{r['installations']:>13} {r['server_per_s']:>14.0f} {r['baseline_per_s']:>16.0f}"
            f" {r['ratio']:>6.2f} {r['floor_per_s']:>13.0f} {r['floor_ratio']:>9.2f}")


def main() -> None:
    print("S1SP ProcessGroupInformation (EA files), best of 5")
    print(HEADER)
    for r in run():
        print(line(r))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
