"""First-start set-up of a development state directory: tokens, PINs, PKI, folders.

Everything is created only if missing, so `make run` twice reuses the same tokens and
certificates. Production deployments skip this: their tokens and PKI exist already.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

from keysvc.config import PARTITIONS, Settings
from keysvc.hsm.store_lock import token_list_lock
from keysvc.pki import ensure_dev_pki

DEV_TOKENS_WAIT = 60.0  # seconds another process may hold the token list (a login: ms)

TEMPLATE = Path(__file__).resolve().parent.parent / "softhsm-config" / "softhsm2.conf.in"
_FALLBACK_TEMPLATE = """directories.tokendir = @TOKENDIR@
objectstore.backend = file
log.level = ERROR
slots.removable = false
"""


def softhsm_conf_path(settings: Settings) -> Path:
    return settings.path("hsm", "softhsm2.conf").resolve()


def point_softhsm_at(settings: Settings) -> None:
    """SoftHSM2 reads SOFTHSM2_CONF once, when the module is first loaded: set it first."""
    if settings.dev and settings.pkcs11_module.endswith("libsofthsm2.so"):
        os.environ["SOFTHSM2_CONF"] = str(softhsm_conf_path(settings))


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def ensure_dev_state(settings: Settings) -> None:
    state = settings.state_dir
    (state / "hsm" / "tokens").mkdir(parents=True, exist_ok=True)
    (state / "hsm" / "pins").mkdir(parents=True, exist_ok=True)
    os.chmod(state / "hsm", 0o700)
    settings.trust_anchors.mkdir(parents=True, exist_ok=True)
    conf = softhsm_conf_path(settings)
    if not conf.exists():
        template = TEMPLATE.read_text() if TEMPLATE.exists() else _FALLBACK_TEMPLATE
        conf.write_text(template.replace("@TOKENDIR@",
                                         str((state / "hsm" / "tokens").resolve())))
    util = shutil.which("softhsm2-util")
    if util is None:
        raise SystemExit("softhsm2-util not found: run `apt-get install -y softhsm2` "
                         "(or `make run`, which installs it)")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    # The token list's lock (keysvc/hsm/store_lock.py): a listing made while another
    # process logs in can miss that token, and this would then make a second one.
    tokens = token_list_lock((state / "hsm" / "tokens").resolve(), DEV_TOKENS_WAIT)
    try:
        with tokens.exclusive():
            _ensure_dev_tokens(settings, util, env)
    finally:
        tokens.close()
    ensure_dev_pki(state / "pki")


def _ensure_dev_tokens(settings: Settings, util: str, env: dict[str, str]) -> None:
    state = settings.state_dir
    shown = subprocess.run([util, "--show-slots"], env=env, capture_output=True,
                           text=True, check=True).stdout
    present = {line.split(":", 1)[1].strip() for line in shown.splitlines()
               if line.strip().startswith("Label:")}
    for partition in PARTITIONS:
        label = settings.token_label(partition)
        if label in present:
            continue
        pin_path = state / "hsm" / "pins" / f"{partition}.pin"
        if not pin_path.exists():
            _write_private(pin_path, secrets.token_hex(12))
        # The SO PIN is kept beside the user PIN: the backup ceremony needs it (only the SO
        # can mark the backup key trusted), nothing else does.
        so_path = state / "hsm" / "pins" / f"{partition}.so-pin"
        if not so_path.exists():
            _write_private(so_path, secrets.token_hex(12))
        subprocess.run([util, "--init-token", "--free", "--label", label,
                        "--so-pin", so_path.read_text().strip(),
                        "--pin", pin_path.read_text().strip()],
                       env=env, check=True, capture_output=True)
