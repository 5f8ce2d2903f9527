"""The reference examples (shared/spec/examples): in process and through the real server.

Each example must give exactly the CMAC KCVs of its expect.json for every key, with every
installation ACCEPTED, and VerifyPrepaymentKey must match the CMAC and ECB KCVs given there.

The examples' transport key names are fixed, and a token can hold each only once, while the
in-process token lives for the whole run and the database is fresh per test. So the
in-process tests put an example's S1SP key in the token the first time and afterwards (or
when another module already did) only register its `keys` row; the server's keys are
loaded into a server of this module's own (`examples_server`).
"""
from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pkcs11 import ObjectClass

from keysvc import s1sp
from keysvc import store as st
from keysvc.api.v1 import keysvc_pb2 as pb
from keysvc.app import App
from keysvc.client import error_reason
from keysvc.device_certificate import TrustStore
from keysvc.errors import KeysvcError
from keysvc.hsm import keys as hk
from keysvc.records.keys import KeyRecord
from keysvc.results import GroupResult
from tests.conftest import EXAMPLES, S1SP
from tests.keyloading import load_aes_key, register_key_record, token_key_id
from tests.support.encoder import kcv

FOLDERS = ["ea-kw", "eb-oaep", "aa-kw"]
DP_GROUPS = ("EA", "EB", "EC")
UNKNOWN_DEVICE = "10-FF-FF-FF-FF-FF-FF-FE"


def load(folder: str) -> tuple[Path, dict]:
    d = EXAMPLES / folder
    return d, json.loads((d / "expect.json").read_text())


# =========================================================================== expectations
def expected(expect: dict) -> dict:
    """What any reader of the example must return, in one comparable shape."""
    dp = expect["group"] in DP_GROUPS
    out = []
    for inst in expect["installations"]:
        keys = {}
        for where, k in inst["keys"].items():
            name = where.split("/", 1)[1]
            keys[where] = (s1sp.ROLE_OF[name] if dp else "SECRET", k["kcv_cmac"])
        out.append({"chf": inst["chf"], "status": inst["expect"], "problems": [],
                    "esme": inst["esme"], "gsme": inst.get("gsme", ""), "keys": keys,
                    "certificate": (True, inst["chf"]) if dp else None})
    return {"file_id": expect["file_id"], "group": expect["group"],
            "originator": expect["originator_id"], "accepted": len(out), "rejected": 0,
            "installations": out}


def shape(r: GroupResult) -> dict:
    return {"file_id": r.migration_file_id, "group": r.group_id, "originator": r.originator_id,
            "accepted": r.accepted_count, "rejected": r.rejected_count,
            "installations": [{
                "chf": i.chf_identifier, "status": i.status,
                "problems": [p.code for p in i.problems], "esme": i.esme_device_id,
                "gsme": i.gsme_device_id,
                "keys": {f"{k.device_id}/{k.name}": (k.role, k.kcv) for k in i.keys},
                "certificate": None if i.device_certificate is None
                else (i.device_certificate.valid, i.device_certificate.device_id)}
                for i in r.installations]}


def shape_pb(r: pb.ProcessGroupInformationResponse) -> dict:
    return {"file_id": r.migration_file_id, "group": r.group_id, "originator": r.originator_id,
            "accepted": r.accepted_count, "rejected": r.rejected_count,
            "installations": [{
                "chf": i.chf_identifier, "status": pb.EntryStatus.Name(i.status),
                "problems": [p.code for p in i.problems], "esme": i.esme_device_id,
                "gsme": i.gsme_device_id,
                "keys": {f"{k.device_id}/{k.name}": (pb.DeviceKeyRole.Name(k.role), k.kcv)
                         for k in i.keys},
                "certificate": (i.device_certificate.valid, i.device_certificate.device_id)
                if i.HasField("device_certificate") else None}
                for i in r.installations]}


def prepayment_keys(expect: dict) -> list[tuple[str, dict]]:
    return [(where.split("/")[0], k) for inst in expect["installations"]
            for where, k in inst["keys"].items() if where.endswith("/PrepaymentKey")]


def other_kcv(expect: dict, device: str) -> str:
    """A real KCV from the file, but of another key than `device`'s prepayment key."""
    own = next(k for d, k in prepayment_keys(expect) if d == device)["kcv_cmac"]
    return next(k["kcv_cmac"] for inst in expect["installations"]
                for k in inst["keys"].values() if k["kcv_cmac"] != own)


# =========================================================================== in process
def ensure_example_key(app: App, folder: Path, expect: dict) -> None:
    """The example's S1SP transport key: into the token once, else only its `keys` row."""
    name, orig = expect["s1sp_transport_key"]["name"], expect["originator_id"]
    with app.partitions.s1sp.session() as s:
        in_token = hk.has_key(s, name) or hk.has_key(s, name, ObjectClass.PRIVATE_KEY)
    if expect["transport"] == "kw":
        key = bytes.fromhex(expect["s1sp_transport_key"]["hex"])
        if not in_token:
            load_aes_key(app, name, key, purpose="S1SP_TRANSPORT", owner_id=orig)
            return
        rec = KeyRecord(name, "s1sp", "S1SP_TRANSPORT", "AES", orig, "SMSO", kcv(key),
                        "ENABLED", dt.datetime.now(dt.timezone.utc),
                        token_key_id(app, "s1sp", name))
    else:
        private = serialization.load_pem_private_key((folder / "s1sp_rsa.pem").read_bytes(),
                                                     None)
        if not in_token:
            from keysvc import keyadmin
            keyadmin.register_existing_rsa_key(app, name=name, purpose="S1SP_TRANSPORT",
                                               allowed_originators=[orig], private_key=private)
            return
        rec = KeyRecord(
            name, "s1sp", "S1SP_TRANSPORT", f"RSA-{private.key_size}", "", "", "", "ENABLED",
            dt.datetime.now(dt.timezone.utc),
            token_key_id(app, "s1sp", name, ObjectClass.PRIVATE_KEY),
            private.public_key().public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo).decode(), (orig,))
    register_key_record(app, rec)


@pytest.mark.parametrize("folder", FOLDERS)
def test_example_processes_in_process_to_expected_kcvs_and_verifies(app, folder):
    d, expect = load(folder)
    ensure_example_key(app, d, expect)
    app.trust = TrustStore(anchors=(x509.load_pem_x509_certificate(
        (d / "device_ca.pem").read_bytes()),))
    data = (d / "file.xml").read_bytes()

    result = s1sp.process_group_information(app, S1SP, data)
    assert shape(result) == expected(expect)
    with app.store.engine.connect() as conn:
        rows = conn.execute(st.device_keys.select()).all()
    assert {f"{r.device_id}/{r.name}": r.kcv for r in rows} == {
        where: k["kcv_cmac"] for inst in expect["installations"]
        for where, k in inst["keys"].items()}
    assert s1sp.process_group_information(app, S1SP, data) == result  # idempotent

    prepay = prepayment_keys(expect)
    assert bool(prepay) == (expect["group"] in DP_GROUPS)
    for device, k in prepay:
        assert s1sp.verify_prepayment_key(app, device, k["kcv_cmac"], "CMAC")
        assert s1sp.verify_prepayment_key(app, device, k["kcv_ecb"], "ECB")
        assert not s1sp.verify_prepayment_key(app, device, k["kcv_ecb"], "CMAC")
        assert not s1sp.verify_prepayment_key(app, device, other_kcv(expect, device), "CMAC")
        wrong = "00000" if k["kcv_cmac"] != "0000000000" else "11111"
        assert not s1sp.verify_prepayment_key(app, device, wrong * 2, "CMAC")
    # a device with no prepayment key (AA ESMEs, EB ESMEs without one) is not found
    keyed = {device for device, _ in prepay}
    for inst in expect["installations"]:
        if inst["esme"] not in keyed:
            with pytest.raises(KeysvcError) as ei:
                s1sp.verify_prepayment_key(app, inst["esme"], "0000000000")
            assert ei.value.code == "DEVICE_KEY_NOT_FOUND"
    with pytest.raises(KeysvcError) as ei:
        s1sp.verify_prepayment_key(app, UNKNOWN_DEVICE, "0000000000")
    assert ei.value.code == "DEVICE_KEY_NOT_FOUND"


# =========================================================================== the server
@pytest.fixture(scope="module")
def examples_server(tmp_path_factory):
    """A server of this module's own, holding the examples' keys by their fixed names.

    Not the session `server`: other modules (test_smoke_e2e) load the same fixed names into
    that one without checking, and the second load of a name fails. The RSA keys enter the
    token from another process (tests.load_rsa_key) after the AES imports, and the server
    restarts so that SoftHSM2 reads the token afresh (see test_dco.dco_server).
    """
    from tests.serverproc import start_server
    state = tmp_path_factory.mktemp("s1sp-examples")
    anchors = sorted(EXAMPLES.glob("*/device_ca.pem"))
    srv = start_server(state, trust_anchors=anchors)
    try:
        for folder in sorted(FOLDERS, key=lambda f: load(f)[1]["transport"] != "kw"):
            srv.load_example_keys(*load(folder))
    finally:
        srv.stop()
    srv = start_server(state, trust_anchors=anchors)
    yield srv
    srv.stop()


def process_on(server, folder: str) -> pb.ProcessGroupInformationResponse:
    d, _ = load(folder)
    return server.as_("s1sp").s1sp.ProcessGroupInformation(
        pb.ProcessGroupInformationRequest(file=(d / "file.xml").read_bytes()), timeout=60)


@pytest.mark.parametrize("folder", FOLDERS)
def test_example_processes_through_the_server_to_expected_kcvs_and_verifies(examples_server,
                                                                             folder):
    _, expect = load(folder)
    r = process_on(examples_server, folder)
    assert shape_pb(r) == expected(expect)
    assert process_on(examples_server, folder) == r  # idempotent

    stub = examples_server.as_("s1sp").s1sp

    def verify(device: str, value: str, method: str) -> bool:
        return stub.VerifyPrepaymentKey(pb.VerifyPrepaymentKeyRequest(
            device_id=device, expected_kcv=value,
            kcv_method=pb.KcvMethod.Value(method))).match

    for device, k in prepayment_keys(expect):
        assert verify(device, k["kcv_cmac"], "CMAC")
        assert verify(device, k["kcv_ecb"], "ECB")
        assert not verify(device, k["kcv_ecb"], "CMAC")
        assert not verify(device, other_kcv(expect, device), "CMAC")
    with pytest.raises(grpc.RpcError) as ei:
        verify(UNKNOWN_DEVICE, "0000000000", "CMAC")
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(ei.value) == "DEVICE_KEY_NOT_FOUND"


def test_no_example_key_reaches_the_server_log_or_database(examples_server):
    for folder in FOLDERS:
        process_on(examples_server, folder)
    secrets: list[str] = []
    raw: list[bytes] = []
    for folder in FOLDERS:
        _, expect = load(folder)
        hexes = [expect["s1sp_transport_key"]["hex"], expect["dco_transport_key"]["hex"]]
        hexes += [k["hex"] for inst in expect["installations"] for k in inst["keys"].values()]
        hexes += [k["hex"] for k in expect["master_keys"].values()]
        for h in hexes:
            raw.append(bytes.fromhex(h))
            secrets += [h.upper(), h.lower(), base64.b64encode(bytes.fromhex(h)).decode()]
    log = examples_server.log()
    assert "ProcessGroupInformation" in log
    db = b"".join(p.read_bytes() for p in Path(examples_server.state_dir).glob("keysvc.db*"))
    for s in secrets:
        assert s not in log, "an example key's text is in the server log"
        assert s.encode() not in db, "an example key's text is in the server's database"
    for r in raw:
        assert r not in db, "an example key's bits are in the server's database"
