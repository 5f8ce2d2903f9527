"""python -m tests.load_rsa_key STATE NAME PEM PURPOSE ORIGINATOR...: load a published test
RSA key into a server's token and register it (the examples' rsa-oaep-mgf1p keys)."""
from __future__ import annotations

import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from keysvc import config, keyadmin
from keysvc.app import App


def main() -> None:
    state, name, pem, purpose, *originators = sys.argv[1:]
    app = App.open(config.load(env={}, state_dir=state))
    try:
        keyadmin.register_existing_rsa_key(
            app, name=name, purpose=purpose, allowed_originators=originators,
            private_key=serialization.load_pem_private_key(Path(pem).read_bytes(), None))
    finally:
        app.close()


if __name__ == "__main__":
    main()
