"""A master key is never in keysvc's process memory (api.md, DCOService UnwrapMasterKeys).

The server runs as its own process with its own small state; after it has unwrapped a file
of known master keys, its whole readable address space is searched for each key, raw and in
hex. SoftHSM2 is a library inside that process, so this also checks that the token wipes
what it unwrapped. Positive controls prove the search sees the process: the request's
MigrationFileID, and binary values that are certainly there (the stored wrapped blobs).
"""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import uuid
from pathlib import Path

import pytest

from keysvc.api.v1 import keysvc_pb2 as pb
from tests.support import encoder as enc

ORIGINATOR = "SMSO-LG-01"
N = 20


def _proc_mem(pid: int) -> list[bytes]:
    """Every readable mapping of the process, read through /proc/PID/mem while it is
    stopped (SIGSTOP/SIGCONT: the server is ours) so that the snapshot is consistent."""
    regions: list[bytes] = []
    os.kill(pid, signal.SIGSTOP)
    try:
        with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
            for line in maps:
                address, perms = line.split()[:2]
                if not perms.startswith("r"):
                    continue
                lo, hi = (int(x, 16) for x in address.split("-"))
                try:
                    mem.seek(lo)
                    regions.append(mem.read(hi - lo))
                except (OSError, OverflowError, ValueError):
                    continue  # [vvar], [vsyscall] and the like
    finally:
        os.kill(pid, signal.SIGCONT)
    return regions


def _gcore(pid: int, where: Path) -> list[bytes]:
    prefix = where / "core"
    out = subprocess.run(["gcore", "-o", str(prefix), str(pid)], capture_output=True,
                         timeout=120)
    core = Path(f"{prefix}.{pid}")
    try:
        if out.returncode != 0 or not core.exists():
            raise OSError(f"gcore failed: {out.stderr[-300:]!r}")
        return [core.read_bytes()]
    finally:
        core.unlink(missing_ok=True)


def dump_memory(pid: int, where: Path) -> tuple[str, list[bytes]]:
    why = []
    try:
        regions = _proc_mem(pid)
        if sum(map(len, regions)) > 1 << 20:
            return "/proc/PID/mem", regions
        why.append("/proc/PID/mem gave almost nothing")
    except OSError as exc:
        why.append(f"/proc/PID/mem: {exc}")
    if shutil.which("gcore"):
        try:
            return "gcore", _gcore(pid, where)
        except (OSError, subprocess.TimeoutExpired) as exc:
            why.append(f"gcore: {exc}")
    else:
        why.append("gcore is not installed")
    pytest.skip("cannot read the server's memory: " + "; ".join(why))


def found(regions: list[bytes], needle: bytes) -> bool:
    return any(needle in r for r in regions)


def key_forms(key: bytes) -> list[bytes]:
    return [key, key.hex().encode(), key.hex().upper().encode()]


@pytest.fixture(scope="module")
def mem(tmp_path_factory):
    """Our own server, a DCO transport key, and a file of N known master keys unwrapped."""
    from tests.serverproc import start_server
    state = tmp_path_factory.mktemp("memory")
    srv = start_server(state)
    try:
        kek = os.urandom(32)
        name = f"DCO-TK-MEM-{uuid.uuid4().hex[:8]}"
        srv.import_aes_key(name, kek, purpose="DCO_TRANSPORT", owner_id=ORIGINATOR)
        insts = enc.random_installations(N, group="EA")
        marker = f"MEMPROBE-{uuid.uuid4().hex}"
        xml = enc.build_file(insts, file_id=marker, originator_id=ORIGINATOR,
                             s1sp_key_name="S1SP-NOT-LOADED", s1sp_kek=os.urandom(32),
                             dco_key_name=name, dco_kek=kek)
        r = srv.as_("dco").dco.UnwrapMasterKeys(pb.UnwrapMasterKeysRequest(file=xml))
        assert r.accepted_count == N, r
        assert [e.kcv for e in r.entries] == [enc.kcv(i.master_key) for i in insts]
        yield srv, insts, marker, kek
    finally:
        srv.stop()


def _stored_wrapped(state: Path) -> list[bytes]:
    con = sqlite3.connect(state / "keysvc.db")
    try:
        return [bytes(w) for (w,) in con.execute("SELECT wrapped FROM master_keys")]
    finally:
        con.close()


def _assert_clean(srv, insts, marker: str, kek: bytes, where: Path) -> None:
    how, regions = dump_memory(srv.proc.pid, where)
    # positive controls: the dump is of this process and the search finds text and bytes
    assert found(regions, marker.encode()), f"{how}: the MigrationFileID is not in the dump"
    wrapped = _stored_wrapped(srv.state_dir)
    assert len(wrapped) == N
    assert any(found(regions, w) for w in wrapped), f"{how}: no stored blob found in the dump"
    leaked = [f"{i.esme}: {'raw' if f == i.master_key else 'hex'}"
              for i in insts for f in key_forms(i.master_key) if found(regions, f)]
    assert not leaked, f"master keys found in the server's memory ({how}): {leaked}"
    assert not any(found(regions, f) for f in key_forms(kek)), \
        "the DCO transport key is in the server's memory"


def test_unwrapped_master_keys_are_not_in_the_server_process_memory(mem, tmp_path):
    srv, insts, marker, kek = mem
    _assert_clean(srv, insts, marker, kek, tmp_path)


def test_verified_master_keys_are_not_in_the_server_process_memory(mem, tmp_path):
    srv, insts, marker, kek = mem
    stub = srv.as_("dco").dco
    for i in insts:
        for method in ("CMAC", "ECB"):
            assert stub.VerifyMasterKey(pb.VerifyMasterKeyRequest(
                device_id=i.esme, expected_kcv=enc.kcv(i.master_key, method),
                kcv_method=pb.KcvMethod.Value(method))).match
    _assert_clean(srv, insts, marker, kek, tmp_path)
