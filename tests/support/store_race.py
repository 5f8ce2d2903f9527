"""Two processes on one SoftHSM2 token through keysvc.hsm (tests/test_hsm_store_lock.py).

`search`: loops over searches the service makes (every secret key's label, data objects
by label). `create`: makes token keys (as an approved import does) and data objects (as
the roster and audit anchors are), reads each back and destroys all but a few. Each prints
its counts as JSON, failures by exception name. `check`: a fresh process's view of the
token: label -> CKA_VALUE_LEN of every secret key, label -> value of every data object.
`nolock` after the seconds runs without the store lock, to show the race it prevents.
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
        hsm_token.for_tokens = lambda module, timeout: store_lock.StoreLock(None, "")
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
                    hk.data_values(s, "d0")
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
                    hk.put_data(s, "d" + label, label.encode())
                    if not hk.has_key(s, label) \
                            or hk.data_values(s, "d" + label) != [label.encode()]:
                        unreadable += 1
                    elif made % KEEP_EVERY:
                        hk.destroy_objects(s, label)
                        hk.destroy_data(s, "d" + label)
                    else:
                        kept.append(label)
            except Exception as exc:
                failures[type(exc).__name__] += 1
        print(json.dumps({"made": made, "kept": kept, "unreadable": unreadable,
                          "failures": failures}))
    else:
        with token.session() as s:
            keys: dict[str, list[int]] = {}
            for o in hk.objects(s, {hk.A.CLASS: hk.ObjectClass.SECRET_KEY}):
                keys.setdefault(o[hk.A.LABEL] or "", []).append(int(o[hk.A.VALUE_LEN] or 0))
            data = {label: [v.decode(errors="replace") for v in values]
                    for label, values in hk.data_by_label(s, "").items()}
            empty = sum(1 for h in s.direct.find_objects(s.raw.handle, hk.Template(
                {hk.A.CLASS: hk.ObjectClass.DATA})) if not s.direct.attribute(
                    s.raw.handle, h, hk.A.LABEL))
        print(json.dumps({"keys": keys, "data": data, "unlabelled_data": empty}))


if __name__ == "__main__":
    main()
