"""A hardened process (issue 16, in part), read from outside as an attacker on the host
would: no core dumps, no PIN in /proc/PID/environ, every file it makes private to it."""
from __future__ import annotations

import ctypes
import json
import os
import stat
from dataclasses import dataclass

import pytest

from keysvc.api.v1 import keysvc_pb2 as pb
from keysvc.config import Settings
from tests.serverproc import start_server


@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    state = tmp_path_factory.mktemp("hardened")
    first = start_server(state)  # makes the development state (tokens, PINs, PKI)
    first.stop()
    pins = {f"KEYSVC_{p.upper()}_PIN": (state / "hsm" / "pins" / f"{p}.pin").read_text().strip()
            for p in ("s1sp", "dco", "admin")}
    # PINs are a deployment's setting: run as one, on the development state's files.
    pki = state / "pki"
    config = state.parent / f"{state.name}.toml"
    config.write_text("\n".join([
        f'tls_cert = "{pki / "server.pem"}"', f'tls_key = "{pki / "server.key"}"',
        f'tls_client_ca = "{pki / "ca.pem"}"', f'trust_anchors_dir = "{state / "trust-anchors"}"',
        'lock_memory = "true"']) + "\n")
    srv = start_server(state, env={**pins, "KEYSVC_CONFIG": str(config),
                                   "SOFTHSM2_CONF": str(state / "hsm" / "softhsm2.conf")})
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
    if os.geteuid() == 0:  # root may lock without a limit
        assert "memory_locked=1" in srv.log()
        locked = next(line for line in open(f"/proc/{srv.proc.pid}/status")
                      if line.startswith("VmLck"))
        assert int(locked.split()[1]) > 0


def _rewrap_child(pid: int, not_: int = 0) -> int | None:
    import subprocess
    import time
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                              text=True).stdout.split()
        for k in kids:
            try:
                if int(k) != not_ and open(f"/proc/{k}/comm").read().strip() == \
                        "keysvc-rewrap":
                    return int(k)
            except OSError:
                continue
        time.sleep(0.2)
    return None


def test_the_rewrap_runs_in_a_hardened_child_at_the_lowest_priority(hardened):
    """Its own process (keysvc/custody/rewrap_process.py): nice 19, its HSM loop in a
    thread under SCHED_IDLE, the thread that holds database locks not (a busy machine must
    not starve it while live calls wait on SQLite's writer lock); no core, no PIN in its
    environment, and it says it is not dumpable."""
    import time
    srv, pins = hardened
    child = _rewrap_child(srv.proc.pid)
    assert child is not None, "no rewrap process"

    def nice_and_policy(stat: str) -> tuple[int, int]:
        fields = stat.rsplit(")", 1)[1].split()
        return int(fields[16]), int(fields[38])
    assert nice_and_policy(open(f"/proc/{child}/stat").read()) == (19, os.SCHED_OTHER)
    deadline = time.monotonic() + 30
    threads: list[tuple[int, int]] = []
    while time.monotonic() < deadline:
        threads = [nice_and_policy(open(f"/proc/{child}/task/{t}/stat").read())
                   for t in os.listdir(f"/proc/{child}/task")]
        if (19, os.SCHED_IDLE) in threads:
            break
        time.sleep(0.2)
    assert (19, os.SCHED_IDLE) in threads, threads
    limits = open(f"/proc/{child}/limits").read()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"]
    seen = open(f"/proc/{child}/environ", "rb").read()
    assert all(pin.encode() not in seen for pin in pins.values())
    deadline = time.monotonic() + 30
    while srv.log().count("process hardened: dumpable=0") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert srv.log().count("process hardened: dumpable=0") == 2


def test_a_rewrap_process_that_dies_is_started_again(hardened):
    import signal
    srv, _ = hardened
    child = _rewrap_child(srv.proc.pid)
    assert child is not None
    os.kill(child, signal.SIGKILL)
    again = _rewrap_child(srv.proc.pid, not_=child)
    assert again is not None and again != child
    assert "the rewrap process ended" in srv.log()
    srv.as_("auditor").audit.VerifyAuditLog(pb.VerifyAuditLogRequest())  # the server serves


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


def _workers(pid: int) -> list[int]:
    out = []
    for child in os.listdir("/proc"):
        if not child.isdigit():
            continue
        try:
            stat_fields = open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()
            cmd = open(f"/proc/{child}/cmdline", "rb").read()
        except OSError:
            continue
        if int(stat_fields[1]) == pid and b"spawn_main" in cmd \
                and open(f"/proc/{child}/comm").read().strip() != "keysvc-rewrap":
            out.append(int(child))
    return out


def test_a_certificate_worker_killed_mid_file_is_replaced_and_the_file_still_processed(
        tmp_path):
    import signal
    import threading
    import time

    from tests.support import encoder
    factory = encoder.DeviceCertificateFactory()
    (tmp_path / "ca.pem").write_bytes(factory.ca_pem)
    srv = start_server(tmp_path / "worker", trust_anchors=[tmp_path / "ca.pem"])
    try:
        s1sp_kek, dco_kek = os.urandom(32), os.urandom(32)
        srv.import_aes_key("W-S1SP", s1sp_kek, purpose="S1SP_TRANSPORT", owner_id="SMSO-W")

        def file(n: int) -> bytes:
            installs = encoder.random_installations(200, seed=n, cert_factory=factory)
            return encoder.build_file(installs, file_id=f"MGEF-W-{n}", originator_id="SMSO-W",
                                      s1sp_key_name="W-S1SP", s1sp_kek=s1sp_kek,
                                      dco_key_name="W-S1SP", dco_kek=dco_kek)
        s1sp = srv.as_("s1sp").s1sp
        s1sp.ProcessGroupInformation(pb.ProcessGroupInformationRequest(file=file(1)))
        (worker,) = _workers(srv.proc.pid)
        result = {}

        def send() -> None:
            result["r"] = s1sp.ProcessGroupInformation(
                pb.ProcessGroupInformationRequest(file=file(2)), timeout=60)
        t = threading.Thread(target=send)
        t.start()
        time.sleep(0.05)
        os.kill(worker, signal.SIGKILL)
        t.join()
        assert result["r"].accepted_count == 200
        # If the kill landed after that file's checks, the next file meets the broken pool:
        # it is replaced then, and that file is checked all the same.
        assert s1sp.ProcessGroupInformation(pb.ProcessGroupInformationRequest(
            file=file(3)), timeout=60).accepted_count == 200
        assert _workers(srv.proc.pid) and worker not in _workers(srv.proc.pid)
    finally:
        srv.stop()


@dataclass(frozen=True)
class SpySettings(Settings):
    """Settings that, unpickled in the rewrap process, write down what they carry."""

    def __setstate__(self, state):
        for k, v in state.items():
            object.__setattr__(self, k, v)
        (state["state_dir"] / "spy.json").write_text(json.dumps({
            "dumpable": ctypes.CDLL(None).prctl(3, 0, 0, 0, 0),
            "pins": [state.get(f"{p}_pin", "") for p in ("s1sp", "dco", "admin")]}))


def test_the_rewrap_process_is_handed_no_pin_before_it_is_hardened(tmp_path):
    """The spawn hands its arguments over before the child can harden itself: the PINs
    are not among them, and follow in a pipe once the child says it is hardened."""
    import time

    from keysvc.custody.rewrap_process import RewrapProcess
    settings = SpySettings(state_dir=tmp_path, s1sp_pin="PIN-1111", dco_pin="PIN-2222",
                           admin_pin="PIN-0000", database_url=f"sqlite:///{tmp_path}/x.db")
    job = RewrapProcess(settings, 10, 10)
    job._spawn()
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "spy.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        seen = json.loads((tmp_path / "spy.json").read_text())
        assert seen["pins"] == ["", "", ""]
    finally:
        job._stop.set()
        job._proc.kill()
        job._proc.join(5)
