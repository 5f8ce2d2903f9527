"""Separate partitions, separate processes (issue 16): the S1SP organisation runs
`keysvc serve --partitions s1sp,admin` with the S1SP and admin PINs only, the DCO
organisation `--partitions dco,admin` with the DCO and admin PINs only, on one database and
one audit chain. The reference example (ea-kw) goes through both, as the README's flow.

Each process is configured as a deployment would be (a configuration file naming only its
own PIN files), on a development state made first, so nothing can hand it the other PIN.
"""
from __future__ import annotations

import json

import grpc
import pytest

from keysvc.api.v1 import keysvc_pb2 as pb
from keysvc.client import error_reason
from tests.conftest import EXAMPLES
from tests.serverproc import start_server
from tests.test_master_key_memory import dump_memory

EXAMPLE = EXAMPLES / "ea-kw"


def _config(state, name: str, partitions: str) -> str:
    pki, pins = state / "pki", state / "hsm" / "pins"
    served = [p for p in partitions.split(",")]
    officers = ",".join(str(pki / f"security-officer-{i}.pem") for i in (1, 2))
    path = state.parent / f"{state.name}-{name}.toml"
    path.write_text("\n".join([
        f'state_dir = "{state}"', f'partitions = "{partitions}"',
        f'initial_officers = "{officers}"',
        f'tls_cert = "{pki / "server.pem"}"', f'tls_key = "{pki / "server.key"}"',
        f'tls_client_ca = "{pki / "ca.pem"}"', f'trust_anchors_dir = "{state / "trust-anchors"}"',
        *(f'{p}_pin_file = "{pins / (p + ".pin")}"' for p in served)]) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    state = tmp_path_factory.mktemp("split")
    start_server(state, trust_anchors=[EXAMPLE / "device_ca.pem"]).stop()  # tokens, PKI
    env = {"SOFTHSM2_CONF": str(state / "hsm" / "softhsm2.conf")}
    s1sp = start_server(state, env={**env, "KEYSVC_CONFIG": _config(state, "s1sp",
                                                                    "s1sp,admin")})
    dco = start_server(state, env={**env, "KEYSVC_CONFIG": _config(state, "dco", "dco,admin")})
    expect = json.loads((EXAMPLE / "expect.json").read_text())
    for srv, field, purpose in ((s1sp, "s1sp_transport_key", "S1SP_TRANSPORT"),
                                (dco, "dco_transport_key", "DCO_TRANSPORT")):
        srv.import_aes_key(expect[field]["name"], bytes.fromhex(expect[field]["hex"]),
                           purpose=purpose, owner_id=expect["originator_id"])
    data = (EXAMPLE / "file.xml").read_bytes()
    group = s1sp.as_("s1sp").s1sp.ProcessGroupInformation(
        pb.ProcessGroupInformationRequest(file=data))
    masters = dco.as_("dco").dco.UnwrapMasterKeys(pb.UnwrapMasterKeysRequest(file=data))
    yield s1sp, dco, expect, group, masters, state
    s1sp.stop()
    dco.stop()


def _reason(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), error_reason(info.value)


def test_each_organisation_processes_its_half_of_the_reference_example(split):
    s1sp, dco, expect, group, masters, _ = split
    got = {f"{k.device_id}/{k.name}": k.kcv for i in group.installations for k in i.keys}
    assert got == {where: k["kcv_cmac"] for i in expect["installations"]
                   for where, k in i["keys"].items()}
    assert {e.device_id: e.kcv for e in masters.entries} == {
        device: m["kcv_cmac"] for device, m in expect["master_keys"].items()}
    device, master = next(iter(expect["master_keys"].items()))
    assert dco.as_("dco").dco.VerifyMasterKey(pb.VerifyMasterKeyRequest(
        device_id=device, expected_kcv=master["kcv_cmac"])).match
    prepay = next((where.split("/")[0], k) for i in expect["installations"]
                  for where, k in i["keys"].items() if where.endswith("/PrepaymentKey"))
    assert s1sp.as_("s1sp").s1sp.VerifyPrepaymentKey(pb.VerifyPrepaymentKeyRequest(
        device_id=prepay[0], expected_kcv=prepay[1]["kcv_cmac"])).match


def test_a_process_does_not_serve_the_other_organisations_service(split):
    """The other organisation's service is refused as any call is: the role first, then
    PARTITION_NOT_SERVED, each audited; health does not report it."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    s1sp, dco, _, _, _, _ = split
    data = (EXAMPLE / "file.xml").read_bytes()
    assert _reason(lambda: s1sp.as_("dco").dco.UnwrapMasterKeys(
        pb.UnwrapMasterKeysRequest(file=data))) == (
        grpc.StatusCode.FAILED_PRECONDITION, "PARTITION_NOT_SERVED")
    assert _reason(lambda: dco.as_("s1sp").s1sp.VerifyPrepaymentKey(
        pb.VerifyPrepaymentKeyRequest(device_id="10-5B-77-0C-A9-80-36-9A",
                                      expected_kcv="8504AFD9DD"))) == (
        grpc.StatusCode.FAILED_PRECONDITION, "PARTITION_NOT_SERVED")
    assert _reason(lambda: dco.as_("dco").s1sp.VerifyPrepaymentKey(
        pb.VerifyPrepaymentKeyRequest()))[1] == "ROLE_NOT_PERMITTED"
    events = dco.as_("auditor").audit.ListAuditEvents(pb.ListAuditEventsRequest(
        action="keysvc.v1.S1SPService/VerifyPrepaymentKey", page_size=100)).events
    assert {e.code for e in events} >= {"PARTITION_NOT_SERVED", "ROLE_NOT_PERMITTED"}
    health = health_pb2_grpc.HealthStub(dco.as_("auditor").channel)
    assert health.Check(health_pb2.HealthCheckRequest(
        service="keysvc.v1.DCOService")).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="keysvc.v1.S1SPService"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_ceremony_for_the_other_partition_is_refused_clearly(split):
    s1sp, dco, _, _, _, _ = split
    officer = s1sp.as_("security-officer-1").admin
    assert _reason(lambda: officer.CreateImportJob(pb.CreateImportJobRequest(
        name="job x", purpose=pb.KeyPurpose.Value("DCO_TRANSPORT")))) == (
        grpc.StatusCode.FAILED_PRECONDITION, "PARTITION_NOT_SERVED")
    other = dco.as_("security-officer-1").admin
    assert _reason(lambda: other.GetKey(pb.GetKeyRequest(name="S1SP-TK-EA-0101"))) == (
        grpc.StatusCode.FAILED_PRECONDITION, "PARTITION_NOT_SERVED")


def test_each_lists_its_own_keys_and_flags_none_of_the_others(split):
    s1sp, dco, expect, _, _, _ = split
    mine = {k.name for k in s1sp.as_("security-officer-1").admin.ListKeys(
        pb.ListKeysRequest()).keys}
    theirs = {k.name for k in dco.as_("security-officer-1").admin.ListKeys(
        pb.ListKeysRequest()).keys}
    assert expect["s1sp_transport_key"]["name"] in mine - theirs
    assert expect["dco_transport_key"]["name"] in theirs - mine
    events = s1sp.as_("auditor").audit.ListAuditEvents(pb.ListAuditEventsRequest(
        action="record.seal_invalid", page_size=100)).events
    assert not events  # another partition's record is never taken for a tampered one


def test_both_processes_write_one_intact_audit_chain(split):
    s1sp, dco, _, _, _, _ = split
    for srv in (s1sp, dco):
        verdict = srv.as_("auditor").audit.VerifyAuditLog(pb.VerifyAuditLogRequest())
        assert verdict.intact and verdict.events_checked > 10
    actions = {e.action for e in dco.as_("auditor").audit.ListAuditEvents(
        pb.ListAuditEventsRequest(page_size=1000)).events}
    assert {"keysvc.v1.S1SPService/ProcessGroupInformation",
            "keysvc.v1.DCOService/UnwrapMasterKeys"} <= actions


def test_the_dco_process_holds_no_s1sp_pin_and_no_s1sp_or_master_key(split, tmp_path):
    """Its memory, read from outside: neither the S1SP PIN (never read), nor a device key
    of the file (DCO never decrypts the S1SP half), nor a master key (unwrapped in the
    token). The admin PIN is there by design (README: the admin partition in a split)."""
    _, dco, expect, _, _, state = split
    how, regions = dump_memory(dco.proc.pid, tmp_path)
    s1sp_pin = (state / "hsm" / "pins" / "s1sp.pin").read_text().strip().encode()
    dco_pin = (state / "hsm" / "pins" / "dco.pin").read_text().strip().encode()
    assert any(dco_pin in r for r in regions), f"control: the DCO PIN is seen ({how})"
    assert not any(s1sp_pin in r for r in regions)
    secrets = [bytes.fromhex(k["hex"]) for i in expect["installations"]
               for k in i["keys"].values()]
    secrets += [bytes.fromhex(m["hex"]) for m in expect["master_keys"].values()]
    secrets.append(bytes.fromhex(expect["s1sp_transport_key"]["hex"]))
    for key in secrets:
        for form in (key, key.hex().encode(), key.hex().upper().encode()):
            assert not any(form in r for r in regions), f"a key is in memory ({how})"


def test_partitions_must_include_admin_and_name_known_ones():
    from keysvc import config

    def problems(value: str) -> list[str]:
        return [p for p in config.problems(config.load(env={}, partitions=value))
                if "partitions" in p]
    assert not problems("s1sp,admin") and not problems("dco,admin") and not problems("admin")
    assert problems("s1sp") and problems("s1sp,hsm,admin") and problems("dco,dco,admin")
    # another organisation's PIN, even handed over, is refused rather than kept
    given = config.problems(config.load(env={"KEYSVC_S1SP_PIN": "1234"},
                                        partitions="dco,admin"))
    assert any("s1sp_pin is given to a process that does not serve s1sp" in p for p in given)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_two_processes_starting_together_on_new_tokens_make_each_key_once(tmp_path,
                                                                          database):
    """Start-up runs one process at a time (Store.starting: a lock file for SQLite, an
    advisory lock for PostgreSQL): the two organisations' processes, or two replicas,
    started at once on new tokens make one `audit-mac`, not two (a label found twice makes
    the token look lost), and migrate the database once."""
    import threading

    from keysvc import config
    from keysvc.devstate import ensure_dev_state
    from tests.conftest import fresh_postgres_database
    for round_ in range(3):
        state = tmp_path / f"round{round_}"
        ensure_dev_state(config.load(env={}, state_dir=state))  # tokens and PKI, no keys
        env = {"SOFTHSM2_CONF": str(state / "hsm" / "softhsm2.conf")}
        if database == "postgresql":
            env["KEYSVC_DATABASE_URL"] = fresh_postgres_database("keysvc_split")
        started: dict[str, object] = {}

        def start(name: str, partitions: str) -> None:
            started[name] = start_server(state, env={
                **env, "KEYSVC_CONFIG": _config(state, name, partitions)})
        threads = [threading.Thread(target=start, args=a)
                   for a in (("s1sp", "s1sp,admin"), ("dco", "dco,admin"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            assert set(started) == {"s1sp", "dco"}
            for srv in started.values():
                verdict = srv.as_("auditor").audit.VerifyAuditLog(pb.VerifyAuditLogRequest())
                assert verdict.intact
        finally:
            for srv in started.values():
                srv.stop()


def test_a_reinitialised_partition_token_beside_its_records_does_not_start(tmp_path):
    """A new S1SP token (re-initialised, or another one under the label) beside an admin
    token that knows the database, and a database that holds S1SP records: refused, at
    every start, before anything is made in it."""
    import shutil
    import subprocess
    state = tmp_path / "state"
    srv = start_server(state)
    srv.import_aes_key("REINIT-S1SP", bytes(range(32)), purpose="S1SP_TRANSPORT",
                       owner_id="SMSO-R")
    srv.stop()
    env = {"SOFTHSM2_CONF": str(state / "hsm" / "softhsm2.conf"),
           "PATH": "/usr/bin:/bin"}
    pins = state / "hsm" / "pins"
    util = shutil.which("softhsm2-util")
    subprocess.run([util, "--delete-token", "--token", "keysvc-s1sp"], env=env, check=True,
                   capture_output=True)
    subprocess.run([util, "--init-token", "--free", "--label", "keysvc-s1sp", "--so-pin",
                    (pins / "s1sp.so-pin").read_text().strip(), "--pin",
                    (pins / "s1sp.pin").read_text().strip()], env=env, check=True,
                   capture_output=True)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="the s1sp token is new"):
            start_server(state)


def test_an_officer_counts_only_where_its_own_organisations_token_vouches_for_it(split):
    """Both processes hold the admin PIN, so the roster (in the admin token) is shared
    trust. An officer enrolled through the DCO process (or written into the roster by
    whoever holds the admin PIN) is enrolled there, and refused by the S1SP process, whose
    own token does not vouch for it: it never counts towards an S1SP ceremony."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from keysvc.pki import issue
    s1sp, dco, _, _, _, state = split
    pki = state / "pki"
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    cert, key = issue(ca, ca_key, "dco-officer-3", role="security-officer")
    (pki / "dco-officer-3.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (pki / "dco-officer-3.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    assert dco.enroll(cert.public_bytes(serialization.Encoding.PEM)).state == \
        pb.Operation.State.Value("APPROVED")
    dco.as_("dco-officer-3").admin.ListKeys(pb.ListKeysRequest())  # counts at the DCO
    import time
    time.sleep(1.2)  # the S1SP process reads the shared roster again
    code, reason = _reason(lambda: s1sp.as_("dco-officer-3").admin.ListKeys(
        pb.ListKeysRequest()))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "OFFICER_NOT_ENROLLED")


def test_a_row_moved_to_the_other_partition_is_an_altered_record_here(split):
    """A database writer moves the S1SP transport key's row to the DCO partition, so that
    the S1SP process would skip it: its anchor is in the S1SP token, so it is refused
    there as altered (RECORD_SEAL_INVALID, audited), not answered PARTITION_NOT_SERVED."""
    import sqlite3
    s1sp, _, expect, _, _, state = split
    name = expect["s1sp_transport_key"]["name"]
    db = sqlite3.connect(state / "keysvc.db")
    db.execute("UPDATE keys SET partition='dco' WHERE name=?", (name,))
    db.commit()
    try:
        officer = s1sp.as_("security-officer-1").admin
        assert _reason(lambda: officer.GetKey(pb.GetKeyRequest(name=name))) == (
            grpc.StatusCode.FAILED_PRECONDITION, "RECORD_SEAL_INVALID")
        listed = officer.ListKeys(pb.ListKeysRequest()).keys
        assert any(not k.seal_intact for k in listed)
        flagged = s1sp.as_("auditor").audit.ListAuditEvents(pb.ListAuditEventsRequest(
            action="record.seal_invalid", page_size=100)).events
        assert any(name in e.target for e in flagged)
    finally:
        db.execute("UPDATE keys SET partition='s1sp' WHERE name=?", (name,))
        db.commit()
        db.close()


def test_what_the_other_side_does_to_the_shared_roster_never_locks_this_side_out(split):
    """The DCO's officers deny an officer both sides share, then allow it again: while
    denied it is refused everywhere (the deny list is shared), and once allowed the S1SP
    process counts it again. The S1SP token's vouches end only by S1SP's own operations."""
    import time

    from cryptography import x509

    from keysvc.identity.certificates import fingerprint
    s1sp, dco, _, _, _, state = split
    fp = fingerprint(x509.load_pem_x509_certificate(
        (state / "pki" / "security-officer-1.pem").read_bytes()))
    requester, approver = dco.as_("dco-officer-3").admin, dco.as_("security-officer-2").admin

    def dual(op: pb.Operation) -> None:
        approver.ApproveOperation(pb.ApproveOperationRequest(
            operation_id=op.operation_id, request_digest=op.request_digest))
    dual(requester.DenyCertificate(pb.DenyCertificateRequest(fingerprint=fp, reason="test")))
    time.sleep(1.2)
    assert _reason(lambda: s1sp.as_("security-officer-1").admin.ListKeys(
        pb.ListKeysRequest()))[1] == "CERTIFICATE_REVOKED"
    dual(requester.AllowCertificate(pb.AllowCertificateRequest(fingerprint=fp)))
    time.sleep(2.5)  # the pending allowance settles, and the S1SP side reads the roster
    s1sp.as_("security-officer-1").admin.ListKeys(pb.ListKeysRequest())
