"""The S1SP path through the real `keysvc serve`: idempotency under concurrent connections,
no secret in the server's log or database, ExportDeviceKeys over gRPC, and the CLI.

The session server trusts only the examples' device CAs, so encoder files here are of group
AA (no DeviceCertificate) to get ACCEPTED installations.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding
from sqlalchemy import create_engine, func, select

from keysvc import store as st
from keysvc.api.v1 import keysvc_pb2 as pb
from keysvc.client import connect, error_reason
from tests.conftest import unique
from tests.serverproc import ROOT, server_env
from tests.support.encoder import (
    TestInstallation,
    encrypt_file,
    kcv,
    plaintext_xml,
    random_installations,
    set_text,
)
from tests.test_s1sp_validation import (
    CONTENT_CV,
    DCO_KEK,
    all_key_texts,
    cipher_value,
    flip,
    with_cipher_value,
)

ORIGINATOR = "SMSO-SRV-01"


@dataclass
class Remote:
    server: object
    key_name: str
    kek: bytes

    def file(self, insts: list[TestInstallation], *, plaintext: bytes | None = None,
             file_id: str | None = None, content_key: bytes | None = None) -> bytes:
        return encrypt_file(
            file_id=file_id or unique("MGEF-SRV"), group_id="AA", originator_type="SMSO",
            originator_id=ORIGINATOR,
            plaintext=plaintext if plaintext is not None else plaintext_xml("AA", insts),
            s1sp_key_name=self.key_name, s1sp_kek=self.kek, dco_key_name="DCO-TK-UNUSED",
            dco_kek=DCO_KEK, master_keys=[i.master_key_entry() for i in insts],
            content_key=content_key)

    def process(self, data: bytes, stub=None) -> pb.ProcessGroupInformationResponse:
        stub = stub or self.server.as_("s1sp").s1sp
        return stub.ProcessGroupInformation(pb.ProcessGroupInformationRequest(file=data),
                                             timeout=60)

    def refused(self, data: bytes) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as ei:
            self.process(data)
        return ei.value


@pytest.fixture(scope="module")
def remote(server) -> Remote:
    name, key = unique("S1SP-TK-SRV"), os.urandom(32)
    server.import_aes_key(name, key, purpose="S1SP_TRANSPORT", owner_id=ORIGINATOR)
    return Remote(server, name, key)


class ServerDb:
    """Read-only look at the server's SQLite database."""

    def __init__(self, server) -> None:
        self.path = Path(server.state_dir) / "keysvc.db"
        self.engine = create_engine(f"sqlite:///{self.path}")

    def count(self, table, *where) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(table).where(*where)
                                ).scalar_one()

    def raw_bytes(self) -> bytes:
        return b"".join(p.read_bytes() for p in self.path.parent.glob("keysvc.db*"))


@pytest.fixture()
def server_db(server):
    db = ServerDb(server)
    yield db
    db.engine.dispose()


def aa_keys_of(r: pb.InstallationResult) -> dict[str, str]:
    return {f"{k.device_id}/{k.name}": k.kcv for k in r.keys}


def expected_aa(inst: TestInstallation) -> dict[str, str]:
    return {f"{inst.esme}/{n}": kcv(k) for n, k in inst.esme_secret_keys().items()}


# =========================================================================== idempotency
def test_same_file_on_eight_connections_at_once_gives_one_result_and_stores_once(
        remote, server, server_db):
    insts = random_installations(3, group="AA")
    plain = set_text(plaintext_xml("AA", insts), "//m:Installation[3]/m:ESMEDetail/m:SecretKey",
                     "00" * 16)
    data = remote.file(insts, plaintext=plain)
    n = 8
    stubs = [connect(server.target, server.state_dir, "s1sp") for _ in range(n)]
    barrier = threading.Barrier(n)
    out: list = [None] * n

    def send(i: int) -> None:
        barrier.wait()
        try:
            out[i] = stubs[i].s1sp.ProcessGroupInformation(
                pb.ProcessGroupInformationRequest(file=data), timeout=60)
        except grpc.RpcError as exc:  # kept for the assertion below
            out[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
    finally:
        for s in stubs:
            s.channel.close()
    errors = [o for o in out if not isinstance(o, pb.ProcessGroupInformationResponse)]
    assert not errors, [(e.code(), error_reason(e), e.details()) for e in errors]
    assert len({o.SerializeToString(deterministic=True) for o in out}) == 1
    r = out[0]
    assert [pb.EntryStatus.Name(i.status) for i in r.installations] == \
        ["ACCEPTED", "ACCEPTED", "REJECTED"]
    for inst, i in zip(insts[:2], r.installations):
        assert aa_keys_of(i) == expected_aa(inst)
    assert server_db.count(st.migration_files,
                           st.migration_files.c.file_id == r.migration_file_id) == 1
    assert server_db.count(st.device_keys, st.device_keys.c.file_id == r.migration_file_id) \
        == 4
    # and once more, afterwards, on the ordinary connection
    assert remote.process(data).SerializeToString(deterministic=True) == \
        r.SerializeToString(deterministic=True)
    assert server_db.count(st.device_keys, st.device_keys.c.file_id == r.migration_file_id) \
        == 4


def test_same_file_id_with_other_bytes_is_already_exists_over_grpc(remote, server_db):
    insts = random_installations(1, group="AA")
    file_id = unique("MGEF-SRV")
    first = remote.process(remote.file(insts, file_id=file_id))
    exc = remote.refused(remote.file(insts, file_id=file_id))
    assert exc.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(exc) == "FILE_ALREADY_PROCESSED"
    assert server_db.count(st.device_keys, st.device_keys.c.file_id == file_id) == \
        len(first.installations[0].keys)


def test_file_level_failures_have_their_status_over_grpc(remote):
    insts = random_installations(1, group="AA")
    data = remote.file(insts)
    cases = [
        (with_cipher_value(data, CONTENT_CV, flip(cipher_value(data, CONTENT_CV), -1)),
         grpc.StatusCode.FAILED_PRECONDITION, "DECRYPTION_FAILED"),
        (remote.file(insts, plaintext=plaintext_xml("AA", insts)[:-5]),
         grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_XML"),
        (data.replace(remote.key_name.encode(), b"NO-SUCH-KEY"),
         grpc.StatusCode.FAILED_PRECONDITION, "UNKNOWN_TRANSPORT_KEY"),
    ]
    for bad, status, reason in cases:
        exc = remote.refused(bad)
        assert (exc.code(), error_reason(exc)) == (status, reason), exc.details()


def test_s1sp_service_refuses_other_roles(remote, server):
    data = remote.file(random_installations(1, group="AA"))
    with pytest.raises(grpc.RpcError) as ei:
        server.as_("dco").s1sp.ProcessGroupInformation(
            pb.ProcessGroupInformationRequest(file=data))
    assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(ei.value) == "ROLE_NOT_PERMITTED"


# =========================================================================== export
def test_export_device_keys_over_grpc_unwrap_to_the_device_keys(remote, server):
    export_name, export_key = unique("S1SP-EXPORT-SRV"), os.urandom(32)
    server.import_aes_key(export_name, export_key, purpose="EXPORT", owner_id="S1SP",
                          owner_type="S1SP")
    inst = random_installations(1, group="AA")[0]
    remote.process(remote.file([inst]))
    stub = server.as_("s1sp").s1sp
    r = stub.ExportDeviceKeys(pb.ExportDeviceKeysRequest(device_id=inst.esme.lower(),
                                                         export_key_name=export_name))
    got = {k.name: aes_key_unwrap_with_padding(export_key, k.wrapped) for k in r.keys}
    assert got == inst.esme_secret_keys()
    assert {k.name: k.kcv for k in r.keys} == {n: kcv(k) for n, k in got.items()}
    for name, reason, status in ((remote.key_name, "WRONG_KEY_PURPOSE",
                                  grpc.StatusCode.FAILED_PRECONDITION),):
        with pytest.raises(grpc.RpcError) as ei:
            stub.ExportDeviceKeys(pb.ExportDeviceKeysRequest(device_id=inst.esme,
                                                             export_key_name=name))
        assert (ei.value.code(), error_reason(ei.value)) == (status, reason)
    with pytest.raises(grpc.RpcError) as ei:
        stub.ExportDeviceKeys(pb.ExportDeviceKeysRequest(device_id="10-00-00-00-00-00-00-09",
                                                         export_key_name=export_name))
    assert (ei.value.code(), error_reason(ei.value)) == (grpc.StatusCode.NOT_FOUND,
                                                         "DEVICE_KEY_NOT_FOUND")


# =========================================================================== secrets
def test_no_key_of_a_processed_file_reaches_the_server_log_or_database(remote, server,
                                                                       server_db):
    insts = random_installations(3, group="AA")
    insts[0].gsme_secret_keys = {"PrepaymentKey": os.urandom(16)}
    bad_text = "0123456789ABCDEF0123456789ABCDEZ"
    plain = set_text(plaintext_xml("AA", insts), "//m:Installation[2]/m:ESMEDetail/m:SecretKey",
                     bad_text)
    plain = set_text(plain, "//m:Installation[3]/m:ESMEDetail/m:SecretKey", "7E" * 16)
    content_keys = [os.urandom(32) for _ in range(3)]
    r = remote.process(remote.file(insts, plaintext=plain, content_key=content_keys[0]))
    assert [pb.EntryStatus.Name(i.status) for i in r.installations] == \
        ["ACCEPTED", "REJECTED", "REJECTED"]
    rejected_messages = " ".join(p.message + p.field for i in r.installations[1:]
                                 for p in i.problems)
    assert {p.code for i in r.installations[1:] for p in i.problems} == {"INVALID_KEY"}
    # an over-long key makes the plaintext schema-invalid: the message names no value
    long_key = insts[1].enc_key.hex().upper() * 2 + "AB"
    too_long = set_text(plaintext_xml("AA", insts), "//m:Installation[1]/m:ESMEDetail/m:SecretKey",
                        long_key)
    exc = remote.refused(remote.file(insts, plaintext=too_long, content_key=content_keys[1]))
    assert error_reason(exc) == "SCHEMA_INVALID"
    details = exc.details()
    data = remote.file(insts, content_key=content_keys[2])
    remote.refused(with_cipher_value(data, CONTENT_CV, flip(cipher_value(data, CONTENT_CV), 20)))

    secrets = all_key_texts(insts, remote.kek, *content_keys) + [
        bad_text, bad_text.lower(), "7E" * 16, "7e" * 16, long_key, long_key.lower()]
    raw_secrets = [k for i in insts for k in (i.auth_key, i.enc_key, i.master_key,
                                              *i.gsme_secret_keys.values())]
    raw_secrets += [remote.kek, *content_keys]
    log = server.log()
    assert "ProcessGroupInformation" in log  # the log is the server's, and it logged calls
    for s in secrets:
        assert s not in log, "a key's text is in the server log"
        assert s not in rejected_messages and s not in details
    db = server_db.raw_bytes()
    for raw in raw_secrets:
        assert raw not in db, "a key's bits are in the server's database"
    for s in secrets:
        assert s.encode() not in db, "a key's text is in the server's database"


# =========================================================================== the CLI
def keysvc_command() -> list[str]:
    exe = Path(sys.executable).parent / "keysvc"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "keysvc.cli"]


def test_cli_process_prints_a_table_with_accepted_and_rejected_rows(remote, server, tmp_path):
    files = {"a-first.xml": random_installations(2, group="AA"),
             "b-second.xml": random_installations(2, group="AA"),
             "c-third.xml": random_installations(1, group="AA")}
    bad = files["b-second.xml"][1]
    for name, insts in files.items():
        plain = plaintext_xml("AA", insts)
        if name == "b-second.xml":
            plain = set_text(plain, "//m:Installation[2]/m:ESMEDetail/m:SecretKey", "00" * 16)
        (tmp_path / name).write_bytes(remote.file(insts, plaintext=plain))
    proc = subprocess.run(
        [*keysvc_command(), "s1sp", "process", str(tmp_path), "--state-dir",
         str(server.state_dir), "--server", server.target],
        env=server_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = out.splitlines()
    for name, insts in files.items():
        for inst in insts:
            line = next((ln for ln in lines if inst.chf in ln), None)
            assert line is not None, f"no row for {inst.chf}:\n{out}"
            assert name in line
            if inst is bad:
                assert "REJECTED" in line and "INVALID_KEY" in line, line
            else:
                assert "ACCEPTED" in line and "REJECTED" not in line, line
                for k in inst.esme_secret_keys().values():
                    assert kcv(k) in line
    assert "3 file(s): 4 accepted, 1 rejected, 0 file(s) refused" in out
    assert "00" * 16 not in out
