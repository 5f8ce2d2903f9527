"""Sealing stored keys: an HMAC per row against one MAC per batch, on the same token.

The S1SP path stores about 3.7 device keys per installation. Issue 12 asked which costs
less: sealing each row (what keysvc does: one C_SignInit + C_Sign per row, direct calls,
keysvc/records/seal.py) or one HMAC per file over the SHA-256 of every row. The write side
is measured here; the read side decides it: with a MAC per batch, checking one device's
row (VerifyPrepaymentKey) means reading and hashing every row of its file.

Tree seals (keysvc/records/tree_seal.py, what keysvc does since issue 18) take the middle:
one MAC per 16 rows over a Merkle root, and each row carries its path, so reading one row
hashes that row and four siblings and makes one HMAC.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

from common import ROOT, baseline_token, best_of


def run(rows: int = 3667, repeats: int = 5) -> dict:
    from keysvc.hsm import keys as hk
    from keysvc.records.seal import canonical

    token = baseline_token(Path(tempfile.mkdtemp(prefix="keysvc-bench-seal-")))
    with token.session() as s:
        if not hk.has_key(s, "bench-seal"):
            hk.generate_hmac(s, "bench-seal")
    data = [canonical("device-key", f"00-00-00-00-00-00-{i // 256:02X}-{i % 256:02X}",
                      "PREPAYMENT", "PrepaymentKey", "00-11-22-33-44-55-66-77", "MGEF-1", 1,
                      "0123456789", os.urandom(40)) for i in range(rows)]

    def per_row() -> None:
        with token.session() as s:
            s.retire_after_use()
            key = hk.session_copy(s, "bench-seal")
            for d in data:
                hk.hmac_sha256_direct(s, key, d)

    def per_row_wrapper() -> None:
        with token.session() as s:
            key = hk.find_key(s, "bench-seal")
            for d in data:
                hk.hmac_sha256(key, d)

    def per_batch() -> None:
        h = hashlib.sha256()
        for d in data:
            h.update(hashlib.sha256(d).digest())
        with token.session() as s:
            hk.hmac_sha256(hk.find_key(s, "bench-seal"), h.digest())

    def tree() -> None:
        from keysvc.records.tree_seal import TreeSealer
        with token.session() as s:
            s.retire_after_use()
            sealer: TreeSealer[bytes] = TreeSealer(s, lambda d: d, "bench-seal")
            for d in data:
                sealer.add(d)
            sealer.finish()

    from keysvc.records import tree_seal
    one_tree = tree_seal.seals(data[:16], lambda m: bytes(32))

    def verify_one_tree() -> None:
        message, _ = tree_seal.opened(data[0], one_tree[0])
        with token.session() as s:
            hk.hmac_sha256(hk.find_key(s, "bench-seal"), message)

    def verify_one_per_row() -> None:
        with token.session() as s:
            hk.hmac_sha256(hk.find_key(s, "bench-seal"), data[0])

    t_row = best_of(repeats, per_row)
    t_wrapper = best_of(repeats, per_row_wrapper)
    t_batch = best_of(repeats, per_batch)
    t_tree = best_of(repeats, tree)
    t_verify_row = best_of(repeats * 20, verify_one_per_row)
    t_verify_tree = best_of(repeats * 20, verify_one_tree)
    token.close()
    return {"rows": rows, "per_row_us": t_row / rows * 1e6,
            "per_row_wrapper_us": t_wrapper / rows * 1e6, "per_batch_us": t_batch / rows * 1e6,
            "tree_us": t_tree / rows * 1e6, "verify_one_row_tree_us": t_verify_tree * 1e6,
            "verify_one_row_per_row_us": t_verify_row * 1e6,
            "verify_one_row_per_batch_us": t_batch * 1e6}


def line(r: dict) -> str:
    return (f"write, per row: HMAC per row {r['per_row_us']:.1f} µs (direct calls), "
            f"{r['per_row_wrapper_us']:.1f} µs (python-pkcs11); one MAC per batch "
            f"{r['per_batch_us']:.2f} µs; tree seals of 16 (keysvc) {r['tree_us']:.1f} µs\n"
            f"read one row: HMAC per row {r['verify_one_row_per_row_us']:.0f} µs; tree seal "
            f"{r['verify_one_row_tree_us']:.0f} µs; MAC per "
            f"batch at least {r['verify_one_row_per_batch_us']:.0f} µs (hash every row of "
            f"a {r['rows']}-row file, before reading them from the database)")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(line(run()))
