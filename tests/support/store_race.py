"""Two processes on one SoftHSM2 token through keysvc.hsm (tests/test_hsm_store_lock.py).

`search`: loops over a search the service makes (every secret key's label). `create`:
makes token keys (as an approved import does), finds each back by its label and destroys
all but a few. Each prints its counts as JSON, failures by exception name. `check`: a fresh
process's view of the token, label -> CKA_VALUE_LEN of every secret key. `nolock` after
the seconds runs without the store lock, to show the race it prevents.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter

from keysvc.hsm import Token, TokenConfig, store_lock
from keysvc.hsm import keys as hk
from keysvc.hsm import token as hsm_token

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
KEEP_EVERY = 100


def main() -> None:
    role, seconds = sys.argv[1], float(sys.argv[2])
    if "nolock" in sys.argv[3:]:
        hsm_token.for_token = lambda module, label, timeout: store_lock.StoreLock(None, label)
    token = Token(TokenConfig(MODULE, "race", os.environ["RACE_PIN"], pool_size=1,
                              retry_after=0.0))
    end = time.monotonic() + seconds
    failures: Counter[str] = Counter()
    if role == "search":
        n = 0
        while time.monotonic() < end:
            n += 1
            try:
                with token.session() as s:
                    hk.secret_key_labels(s)
            except Exception as exc:
                failures[type(exc).__name__] += 1
        print(json.dumps({"searches": n, "failures": failures}))
    elif role == "create":
        made, kept, unreadable = 0, [], 0
        while time.monotonic() < end:
            label = f"k{made}"
            made += 1
            try:
                with token.session() as s:
                    hk.create_aes(s, os.urandom(32), token=True, label=label,
                                  usage=hk.KEK_USAGE)
                    if not hk.has_key(s, label):
                        unreadable += 1
                    elif made % KEEP_EVERY:
                        hk.destroy_objects(s, label)
                    else:
                        kept.append(label)
            except Exception as exc:
                failures[type(exc).__name__] += 1
        print(json.dumps({"made": made, "kept": kept, "unreadable": unreadable,
                          "failures": failures}))
    else:
        with token.session() as s:
            found: dict[str, list[int]] = {}
            for o in hk.objects(s, {hk.A.CLASS: hk.ObjectClass.SECRET_KEY}):
                found.setdefault(o[hk.A.LABEL] or "", []).append(int(o[hk.A.VALUE_LEN] or 0))
        print(json.dumps(found))


if __name__ == "__main__":
    main()
