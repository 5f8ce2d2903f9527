"""The HSM in another process through Debian's p11-kit (issue 16): measured, and blocked.

`p11-kit server` exposes a SoftHSM2 token on a Unix socket and `p11-kit-client.so` is the
module a process then loads, as a network HSM's is. The client serialises a mechanism only
if its list knows the mechanism's parameters, and refuses the others with
CKR_MECHANISM_INVALID before anything reaches the socket:
- p11-kit 0.24.1 (Debian 12, and bookworm-backports has nothing newer) refuses AES key wrap
  (RFC 3394 and 5649, the files' transport wrapping), AES-GCM (the group information) and
  AES-CMAC (every KCV);
- upstream 0.25.0 added CMAC, GCM and CBC, but no release up to 0.26.4 carries
  CKM_AES_KEY_WRAP or CKM_AES_KEY_WRAP_PAD (read in p11-kit's rpc-message.c; measured with
  Debian 13's 0.25.5 in a chroot), and Debian 13's packages need a newer glibc than 12's.
This test is the witness: it fails on the day AES key wrap crosses the socket, which is the
day the remote mode can be built on Debian's packages.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest

from tests.serverproc import ROOT, server_env, start_server

PROBE = r'''
import os, sys, pkcs11
from pkcs11 import Attribute, KeyType, Mechanism
lib = pkcs11.lib(sys.argv[1])
token = next(iter(lib.get_tokens()))
with token.open(user_pin=os.environ["PIN"], rw=True) as s:
    k = s.generate_key(KeyType.AES, 256, store=False,
                       template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False})
    w = s.generate_key(KeyType.AES, 256, store=False,
                       template={Attribute.WRAP: True, Attribute.UNWRAP: True})
    tries = {
        "AES_ECB": lambda: k.encrypt(b"\0" * 16, mechanism=Mechanism.AES_ECB),
        "AES_CMAC": lambda: k.sign(b"\0" * 16, mechanism=Mechanism.AES_CMAC),
        "AES_GCM": lambda: k.encrypt(b"x", mechanism=Mechanism.AES_GCM,
                                     mechanism_param=pkcs11.GCMParams(b"\0" * 12, b"", 128)),
        "AES_KEY_WRAP": lambda: w.wrap_key(k, mechanism=Mechanism.AES_KEY_WRAP),
    }
    for name, attempt in tries.items():
        try:
            attempt()
            print(name, "ok")
        except pkcs11.exceptions.MechanismInvalid:
            print(name, "refused")
'''


def test_p11_kit_client_refuses_the_profiles_mechanisms_so_remote_mode_waits(tmp_path):
    client = next(iter(glob.glob("/usr/lib/*/pkcs11/p11-kit-client.so")), None)
    if shutil.which("p11-kit") is None or client is None:
        pytest.skip("p11-kit or p11-kit-modules is not installed (make test installs them)")
    state = tmp_path / "state"
    start_server(state).stop()  # a development state: tokens and PINs
    env = server_env({"SOFTHSM2_CONF": str(state / "hsm" / "softhsm2.conf")})
    socket = tmp_path / "p11.sock"
    said = tmp_path / "p11-kit.env"
    with open(said, "w") as out:  # (a pipe would stay open in the daemon it leaves behind)
        subprocess.run(["p11-kit", "server", "-s", "-n", str(socket), "--provider",
                        "/usr/lib/softhsm/libsofthsm2.so", "pkcs11:token=keysvc-s1sp"],
                       env=env, stdout=out, stderr=subprocess.DEVNULL, timeout=30, check=True)
    pid = int(said.read_text().split("P11_KIT_SERVER_PID=")[1].split(";")[0])
    try:
        probe = subprocess.run(
            [sys.executable, "-c", PROBE, client], cwd=ROOT, capture_output=True, text=True,
            timeout=60, env={**env, "P11_KIT_SERVER_ADDRESS": f"unix:path={socket}",
                             "PIN": (state / "hsm" / "pins" / "s1sp.pin").read_text().strip()})
    finally:
        os.kill(pid, 15)
    assert probe.returncode == 0, probe.stderr
    seen = dict(line.split() for line in probe.stdout.splitlines())
    assert seen["AES_ECB"] == "ok"  # the socket works
    assert seen["AES_KEY_WRAP"] == "refused", (
        f"p11-kit now carries {seen}: the remote-HSM mode of issue 16 can be built "
        "(check AES-CMAC and AES-GCM too)")
