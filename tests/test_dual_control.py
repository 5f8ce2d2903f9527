"""Dual control between the S1SP and DCO partitions, on a real server (api.md, crypto profile).

The S1SP must never obtain a master key and the DCO never group information or device keys:
separate roles at the API, separate tokens underneath. This module runs its own server so
that it alone decides what is in that server's tokens.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import grpc
import pytest

from keysvc.api.v1 import keysvc_pb2 as pb
from keysvc.client import error_reason
from tests.conftest import EXAMPLES
from tests.support import encoder as enc

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
EA = EXAMPLES / "ea-kw"
EB = EXAMPLES / "eb-oaep"


def _expect(d: Path) -> dict:
    return json.loads((d / "expect.json").read_text())


@pytest.fixture(scope="module")
def device_ca():
    return enc.DeviceCertificateFactory("Dual Control Test Device CA")


@pytest.fixture(scope="module")
def srv(tmp_path_factory, device_ca):
    from tests.serverproc import start_server
    state = tmp_path_factory.mktemp("dual-control")
    ca = state.parent / f"{state.name}-ca.pem"
    ca.write_bytes(device_ca.ca_pem)
    anchors = [*sorted(EXAMPLES.glob("*/device_ca.pem")), ca]
    s = start_server(state, trust_anchors=anchors)
    # eb-oaep's RSA keys enter the token from another process (tests.load_rsa_key); a
    # running SoftHSM2 loses sight of such objects once it writes the token itself, so the
    # AES imports go first and the server restarts after the RSA keys are in.
    s.load_example_keys(EA, _expect(EA))
    s.load_example_keys(EB, _expect(EB))
    s.stop()
    s = start_server(state, trust_anchors=anchors)
    yield s
    s.stop()


# --------------------------------------------------------------------------- roles
def _dco_calls(data: bytes):
    return [("ValidateMasterKeys", pb.ValidateMasterKeysRequest(file=data)),
            ("UnwrapMasterKeys", pb.UnwrapMasterKeysRequest(file=data)),
            ("VerifyMasterKey", pb.VerifyMasterKeyRequest(
                device_id="10-5B-77-0C-A9-80-36-9A", expected_kcv="86D70D9F83"))]


def _s1sp_calls(data: bytes):
    return [("ProcessGroupInformation", pb.ProcessGroupInformationRequest(file=data)),
            ("VerifyPrepaymentKey", pb.VerifyPrepaymentKeyRequest(
                device_id="10-5B-77-0C-A9-80-36-9A", expected_kcv="8504AFD9DD")),
            ("VerifyDeviceCertificate", pb.VerifyDeviceCertificateRequest(
                certificate=b"x", chf_identifier="00-94-D8-31-E8-F7-8A-EC")),
            ("ExportDeviceKeys", pb.ExportDeviceKeysRequest(
                device_id="10-5B-77-0C-A9-80-36-9A", export_key_name="any")),
            ("ReleaseRollbackCertificates", pb.ReleaseRollbackCertificatesRequest(
                chf_identifier="00-94-D8-31-E8-F7-8A-EC", reason="test"))]


def _assert_denied(call, request) -> None:
    with pytest.raises(grpc.RpcError) as ei:
        call(request)
    assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED, ei.value
    assert error_reason(ei.value) == "ROLE_NOT_PERMITTED"


def _denials(srv, identity: str, service: str) -> list:
    events = srv.as_("auditor").audit.ListAuditEvents(
        pb.ListAuditEventsRequest(actor=identity, page_size=1000)).events
    return [e for e in events if e.action.startswith(f"keysvc.v1.{service}/")
            and e.outcome == "DENIED" and e.code == "ROLE_NOT_PERMITTED"]


def test_an_s1sp_certificate_is_role_not_permitted_on_dco_service(srv):
    data = (EA / "file.xml").read_bytes()
    stub = srv.as_("s1sp").dco
    for method, request in _dco_calls(data):
        _assert_denied(getattr(stub, method), request)
    # nothing happened: no master key of the file was stored
    with pytest.raises(grpc.RpcError) as ei:
        srv.as_("dco").dco.VerifyMasterKey(_dco_calls(data)[2][1])
    assert error_reason(ei.value) == "DEVICE_KEY_NOT_FOUND"
    denied = _denials(srv, "s1sp", "DCOService")
    assert {e.action.rsplit("/", 1)[1] for e in denied} >= {m for m, _ in _dco_calls(data)}


def test_a_dco_certificate_is_role_not_permitted_on_s1sp_service(srv):
    data = (EA / "file.xml").read_bytes()
    stub = srv.as_("dco").s1sp
    for method, request in _s1sp_calls(data):
        _assert_denied(getattr(stub, method), request)
    denied = _denials(srv, "dco", "S1SPService")
    assert {e.action.rsplit("/", 1)[1] for e in denied} >= {m for m, _ in _s1sp_calls(data)}


@pytest.mark.parametrize("identity", ["s1sp", "dco"])
def test_neither_s1sp_nor_dco_may_administer_keys(srv, identity):
    _assert_denied(srv.as_(identity).admin.ListKeys, pb.ListKeysRequest())


# --------------------------------------------------------------------------- tokens
OBJECT_HEADER = re.compile(r"^(Secret Key|Private Key|Public Key|Certificate|Data) [Oo]bject")


def list_token(state: Path, partition: str) -> list[tuple[str, str]]:
    """(object type, label) of every object in the server's token, as pkcs11-tool shows it."""
    pin = (state / "hsm" / "pins" / f"{partition}.pin").read_text().strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYSVC_")}
    env["SOFTHSM2_CONF"] = str(state / "hsm" / "softhsm2.conf")
    out = subprocess.run(["pkcs11-tool", "--module", SOFTHSM, "--token-label",
                          f"keysvc-{partition}", "--login", "--pin", pin, "--list-objects"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    objects: list[list[str]] = []
    for line in out.stdout.splitlines():
        m = OBJECT_HEADER.match(line)
        if m:
            objects.append([m.group(1), ""])
        elif objects and line.strip().startswith("label:"):
            objects[-1][1] = line.split(":", 1)[1].strip()
    return sorted((t, label) for t, label in objects)


def _allowed(label: str, transport_keys: set[str]) -> bool:
    label = label.strip("'")
    anchor = re.fullmatch(r"rec:[0-9a-f]+:(key|op)/(.+)", label)  # sealed records' anchors
    return (label in ("storage-key", "component-seal", "record-seal")
            or label in transport_keys
            or re.fullmatch(r"import-job:ij-[0-9a-f]+", label) is not None
            or (anchor is not None and (anchor[1] == "op" or anchor[2] in transport_keys)))


def _check_partition(objects, own: set[str], others: set[str], ids: set[str]) -> None:
    labels = {label for _, label in objects}
    assert all(_allowed(label, own) for label in labels), sorted(labels)
    assert not labels & others, "the other partition's transport key is in this token"
    assert [t for t, label in objects if label == "storage-key"] == ["Secret Key"]
    text = " ".join(labels).upper()
    for ident in ids:
        assert ident not in text and ident.replace("-", "") not in text, ident
    # every secret key is the storage key, the component-seal or record-seal key or a
    # transport key: no device or master key
    assert all(label in ("storage-key", "component-seal", "record-seal") or label in own
               for t, label in objects if t == "Secret Key")


def _ids(expect: dict) -> set[str]:
    out = set(expect["master_keys"])
    for inst in expect["installations"]:
        out.update(x for x in (inst["chf"], inst["esme"], inst.get("gsme")) if x)
    return out


def _process_both(srv, data: bytes) -> tuple:
    g = srv.as_("s1sp").s1sp.ProcessGroupInformation(pb.ProcessGroupInformationRequest(file=data))
    m = srv.as_("dco").dco.UnwrapMasterKeys(pb.UnwrapMasterKeysRequest(file=data))
    return g, m


def test_after_s1sp_and_dco_processing_neither_token_holds_the_other_partitions_keys(
        srv, device_ca):
    ea, eb = _expect(EA), _expect(EB)
    s1sp_keys = {ea["s1sp_transport_key"]["name"], eb["s1sp_transport_key"]["name"]}
    dco_keys = {ea["dco_transport_key"]["name"], eb["dco_transport_key"]["name"]}
    ids = _ids(ea) | _ids(eb)

    for d, expect in ((EA, ea), (EB, eb)):
        g, m = _process_both(srv, (d / "file.xml").read_bytes())
        n = len(expect["installations"])
        assert g.accepted_count == n and m.accepted_count == n, (g, m)
    # the keys are where they belong, usable only through their own role
    dev, mk = next(iter(ea["master_keys"].items()))
    assert srv.as_("dco").dco.VerifyMasterKey(pb.VerifyMasterKeyRequest(
        device_id=dev, expected_kcv=mk["kcv_cmac"])).match
    pre = ea["installations"][0]["keys"][f"{dev}/PrepaymentKey"]
    assert srv.as_("s1sp").s1sp.VerifyPrepaymentKey(pb.VerifyPrepaymentKeyRequest(
        device_id=dev, expected_kcv=pre["kcv_cmac"])).match

    s1sp_before = list_token(srv.state_dir, "s1sp")
    dco_before = list_token(srv.state_dir, "dco")
    _check_partition(s1sp_before, s1sp_keys, dco_keys, ids)
    _check_partition(dco_before, dco_keys, s1sp_keys, ids)
    # the transport keys each example loaded are there (the listing is really of this server)
    assert s1sp_keys <= {label for _, label in s1sp_before}
    assert dco_keys <= {label for _, label in dco_before}

    # more devices through both paths, under the same transport keys: nothing is added
    insts = enc.random_installations(12, group="EA", cert_factory=device_ca)
    data = enc.build_file(insts, group_id="EA", file_id="MGEF-DUAL-CONTROL-2",
                          originator_id=ea["originator_id"],
                          s1sp_key_name=ea["s1sp_transport_key"]["name"],
                          s1sp_kek=bytes.fromhex(ea["s1sp_transport_key"]["hex"]),
                          dco_key_name=ea["dco_transport_key"]["name"],
                          dco_kek=bytes.fromhex(ea["dco_transport_key"]["hex"]))
    g, m = _process_both(srv, data)
    assert g.accepted_count == 12 and m.accepted_count == 12, (g, m)
    for i in insts[:3]:
        assert srv.as_("dco").dco.VerifyMasterKey(pb.VerifyMasterKeyRequest(
            device_id=i.esme, expected_kcv=enc.kcv(i.master_key))).match
    more = {x for i in insts for x in (i.chf, i.esme, i.gsme) if x}
    s1sp_after = list_token(srv.state_dir, "s1sp")
    dco_after = list_token(srv.state_dir, "dco")
    assert s1sp_after == s1sp_before
    assert dco_after == dco_before
    _check_partition(s1sp_after, s1sp_keys, dco_keys, ids | more)
    _check_partition(dco_after, dco_keys, s1sp_keys, ids | more)
