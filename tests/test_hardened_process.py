"""A hardened process (issue 16, in part), read from outside as an attacker on the host
would: no core dumps, no PIN in /proc/PID/environ, every file it makes private to it."""
from __future__ import annotations

import os
import stat

import pytest

from keysvc.api.v1 import keysvc_pb2 as pb
from tests.serverproc import start_server


@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    state = tmp_path_factory.mktemp("hardened")
    first = start_server(state)  # makes the development state (tokens, PINs, PKI)
    first.stop()
    pins = {f"KEYSVC_{p.upper()}_PIN": (state / "hsm" / "pins" / f"{p}.pin").read_text().strip()
            for p in ("s1sp", "dco", "admin")}
    srv = start_server(state, env=pins)
    srv.as_("security-officer-1").admin.ListKeys(pb.ListKeysRequest())  # a file or two more
    yield srv, pins
    srv.stop()


def test_pins_given_in_the_environment_are_not_in_proc_environ(hardened):
    srv, pins = hardened
    environ = (f"/proc/{srv.proc.pid}/environ")
    seen = open(environ, "rb").read()
    assert all(pin.encode() not in seen for pin in pins.values())
    assert b"KEYSVC_S1SP_PIN" not in seen
    # ... and the server did log in with them (it serves).
    srv.as_("auditor").audit.VerifyAuditLog(pb.VerifyAuditLogRequest())


def test_no_core_file_can_be_written(hardened):
    srv, _ = hardened
    limits = open(f"/proc/{srv.proc.pid}/limits").read()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"]


def test_the_process_says_it_is_not_dumpable_and_whether_memory_is_locked(hardened):
    srv, _ = hardened
    assert "process hardened: dumpable=0 core=0 memory_locked=" in srv.log()


def test_every_file_the_server_makes_is_private(hardened):
    srv, _ = hardened
    made = [srv.state_dir / "keysvc.db", *(srv.state_dir / "audit").iterdir()]
    made += [p for p in srv.state_dir.glob("keysvc.db-*")]
    assert made
    for path in made:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode & 0o077 == 0, f"{path.name} is {oct(mode)}"
    for d in (srv.state_dir / "audit",):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
