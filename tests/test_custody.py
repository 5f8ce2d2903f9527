"""Custody (issue 15): the long-lived keys leave the token only for the backup ceremony,
any 2 of 3 custodians restore them into an empty token, and one cannot.

The drill runs the README's commands against a real server: populate it (stored device and
master keys, an escrow, audit events), back up every partition to three enrolled officers,
delete the token directory, restore with 2 of 3 shares, restart, and check that every
stored key verifies by KCV, the escrow releases and the audit chain is intact.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pkcs11
import pytest
from pkcs11 import Attribute as A
from pkcs11 import KeyType, Mechanism, ObjectClass

from keysvc.api.v1 import keysvc_pb2 as pb
from keysvc.custody import shares as sh
from tests.serverproc import ROOT, server_env, start_server
from tests.support import encoder
from tests.support.clientcerts import issue
from tests.support.encoder import kcv


def keysvc(*argv: str, state: Path, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "keysvc.cli", *argv, "--state-dir", str(state)],
                         cwd=ROOT, env=server_env(), capture_output=True, text=True,
                         timeout=120)
    if check and out.returncode:
        pytest.fail(f"keysvc {argv[:2]} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


def _softhsm_env(state: Path) -> dict:
    return {**server_env(), "SOFTHSM2_CONF": str(state / "hsm" / "softhsm2.conf")}


def token_objects(state: Path, partition: str) -> list[str]:
    """Labels of every object in a partition's token, read by another process."""
    out = subprocess.run(
        [sys.executable, "-c", f"""
import pkcs11
from pathlib import Path
from keysvc.config import Settings
lib = pkcs11.lib(Settings().pkcs11_module)
pin = Path('{state}/hsm/pins/{partition}.pin').read_text().strip()
with lib.get_token(token_label='keysvc-{partition}').open(user_pin=pin) as s:
    print(sorted(o[pkcs11.Attribute.LABEL] for o in s.get_objects()))
"""], env=_softhsm_env(state), capture_output=True, text=True, check=True)
    return eval(out.stdout)


# =========================================================================== the drill
@pytest.fixture(scope="module")
def drill(tmp_path_factory):
    work = tmp_path_factory.mktemp("custody")
    state = work / "server"
    factory = encoder.DeviceCertificateFactory()
    (work / "ca.pem").write_bytes(factory.ca_pem)
    srv = start_server(state, trust_anchors=[work / "ca.pem"])
    kek_s, kek_d = os.urandom(32), os.urandom(32)
    srv.import_aes_key("C-S1SP", kek_s, purpose="S1SP_TRANSPORT", owner_id="SMSO-C")
    srv.import_aes_key("C-DCO", kek_d, purpose="DCO_TRANSPORT", owner_id="SMSO-C")
    installs = encoder.random_installations(3, cert_factory=factory)
    data = encoder.build_file(installs, file_id="MGEF-C-1", originator_id="SMSO-C",
                              s1sp_key_name="C-S1SP", s1sp_kek=kek_s, dco_key_name="C-DCO",
                              dco_kek=kek_d)
    srv.as_("s1sp").s1sp.ProcessGroupInformation(pb.ProcessGroupInformationRequest(file=data))
    srv.as_("dco").dco.UnwrapMasterKeys(pb.UnwrapMasterKeysRequest(file=data))
    today = dt.date.today()
    chf = installs[0].chf
    srv.as_("security-officer-1").admin.EscrowRollbackCertificates(
        pb.EscrowRollbackCertificatesRequest(
            smso_id="SMSO-C", group_id="EA", chf_identifiers=[chf],
            certificates=[installs[0].certificate_der],
            valid_from=pb.Date(year=(today - dt.timedelta(days=2)).year,
                               month=(today - dt.timedelta(days=2)).month,
                               day=(today - dt.timedelta(days=2)).day),
            valid_to=pb.Date(year=(today + dt.timedelta(days=2)).year,
                             month=(today + dt.timedelta(days=2)).month,
                             day=(today + dt.timedelta(days=2)).day)))
    # A third officer, so that the backup has three custodians.
    issue(srv, work, "custodian-3", cn="custodian-3", enroll=True)
    pki = state / "pki"
    custodians = [(pki / "security-officer-1.pem", pki / "security-officer-1.key"),
                  (pki / "security-officer-2.pem", pki / "security-officer-2.key"),
                  (work / "pki" / "custodian-3.pem", work / "pki" / "custodian-3.key")]
    backup = work / "backup"
    out = keysvc("admin", "backup", "--partition", "all", "--threshold", "2", "--out",
                 str(backup), *[a for c, _ in custodians for a in ("--custodian", str(c))],
                 state=state)
    srv.as_("auditor").audit.VerifyAuditLog(pb.VerifyAuditLogRequest())
    assert srv.stop() == 0
    return {"state": state, "server": srv, "installs": installs, "chf": chf,
            "backup": backup, "custodians": custodians, "out": out.stdout, "work": work}


def _shares(d, partition: str, which: list[int]) -> list[str]:
    blob = next(d["backup"].glob(f"{partition}-*.backup"))
    bid = blob.name.split("-", 1)[1].removesuffix(".backup")
    args = ["--blob", str(blob)]
    for i in which:
        share = next(d["backup"].glob(f"{partition}-{bid}.share-{i + 1}-*.json"))
        args += ["--share", f"{share}:{d['custodians'][i][1]}"]
    return args


def _lose_the_tokens(state: Path) -> None:
    """The token directory is gone; empty tokens with the same labels and PINs are made
    (what an operator does with a replacement HSM partition)."""
    shutil.rmtree(state / "hsm" / "tokens")
    subprocess.run([sys.executable, "-c", f"""
from keysvc import config
from keysvc.devstate import ensure_dev_state
ensure_dev_state(config.load(None, state_dir='{state}'))
"""], cwd=ROOT, env=server_env(), check=True)


@pytest.fixture(scope="module")
def restored(drill):
    state = drill["state"]
    _lose_the_tokens(state)
    one = keysvc("admin", "restore", "--partition", "s1sp", *_shares(drill, "s1sp", [1]),
                 state=state, check=False)
    drill["one_share"] = (one.returncode, one.stderr, token_objects(state, "s1sp"))
    for p in ("admin", "s1sp", "dco"):
        keysvc("admin", "restore", "--partition", p, *_shares(drill, p, [0, 2]), state=state)
    srv = start_server(state)
    yield drill, srv
    srv.stop()


def test_backup_writes_one_blob_and_three_encrypted_shares_per_partition(drill):
    for p in ("s1sp", "dco", "admin"):
        assert len(list(drill["backup"].glob(f"{p}-*.backup"))) == 1
        shares = list(drill["backup"].glob(f"{p}-*.share-*.json"))
        assert len(shares) == 3
        for f in shares:  # no share in clear: each is a ciphertext for one custodian
            s = sh.Share.from_json(f.read_text())
            assert s.algorithm.startswith("ECIES") and len(s.ciphertext) == 32 + 16


def test_backup_blob_holds_no_key_in_clear(drill):
    """The blob's manifest is encrypted; the header names versions and custodians only."""
    blob = json.loads(next(drill["backup"].glob("s1sp-*.backup")).read_text())
    assert set(blob) == {"header", "ciphertext"}
    assert blob["header"]["versions"]["storage-key"] == [1]
    assert blob["header"]["threshold"] == 2 and len(blob["header"]["custodians"]) == 3


def test_restore_with_one_share_is_refused_and_changes_nothing(restored):
    drill, _ = restored
    code, err, objects = drill["one_share"]
    assert code != 0 and "NOT_ENOUGH_SHARES" in err
    assert objects == []


def test_restored_tokens_hold_every_long_lived_key(restored):
    drill, _ = restored
    assert {"storage-key", "component-seal", "record-seal"} <= set(
        token_objects(drill["state"], "s1sp"))
    assert {"audit-mac", "escrow-seal", "record-seal"} <= set(
        token_objects(drill["state"], "admin"))


def test_after_restore_every_stored_device_and_master_key_verifies_by_kcv(restored):
    drill, srv = restored
    for inst in drill["installs"]:
        r = srv.as_("s1sp").s1sp.VerifyPrepaymentKey(pb.VerifyPrepaymentKeyRequest(
            device_id=inst.esme, expected_kcv=kcv(inst.prepay_key)))
        assert r.match
        r = srv.as_("dco").dco.VerifyMasterKey(pb.VerifyMasterKeyRequest(
            device_id=inst.esme, expected_kcv=kcv(inst.master_key)))
        assert r.match


def test_after_restore_the_escrow_releases_as_before(restored):
    drill, srv = restored
    r = srv.as_("s1sp").s1sp.ReleaseRollbackCertificates(
        pb.ReleaseRollbackCertificatesRequest(chf_identifier=drill["chf"], reason="drill"))
    assert list(r.certificates) == [drill["installs"][0].certificate_der]


def test_after_restore_the_audit_log_is_intact_and_tells_of_backup_and_restore(restored):
    drill, srv = restored
    v = srv.as_("auditor").audit.VerifyAuditLog(pb.VerifyAuditLogRequest())
    assert v.intact, v
    actions = [e.action for e in srv.as_("auditor").audit.ListAuditEvents(
        pb.ListAuditEventsRequest(page_size=1000)).events]
    assert actions.count("custody.backup") == 3 and actions.count("custody.restore") == 3


def test_the_audit_anchor_is_backed_up_and_restored_in_fixed_form(restored):
    """The restarted server moves an anchor of its own; those restored beside it are the
    backup's, written back as fixed objects (keysvc/audit/anchor.py `fixed_form`), and
    VerifyAuditLog (intact, above) found it in the chain."""
    drill, srv = restored
    anchors = [label for label in token_objects(drill["state"], "admin")
               if label.startswith("audit-anchor:")]
    fixed = [label for label in anchors if "@" not in label]
    moving = [label for label in anchors if "@" in label]
    # (One per writer at the backup: the server's, and the backup command's own.)
    assert fixed and len(set(fixed)) == 1 and len(moving) == 1
    assert moving[0].startswith(fixed[0] + "@")


def test_after_restore_every_key_version_shows_as_backed_up(restored):
    """Backup freshness: the last backup's id and time, and every version it holds."""
    drill, srv = restored
    r = srv.as_("security-officer-1").admin.ListKeyVersions(pb.ListKeyVersionsRequest())
    assert {b.partition for b in r.backups if b.backup_id and b.HasField("time")} == \
        {"s1sp", "dco", "admin"}
    assert r.versions and all(v.backed_up for v in r.versions)


def test_a_custodian_named_twice_is_refused_before_any_token_changes(restored):
    drill, _ = restored
    c = str(drill["custodians"][0][0])
    out = keysvc("admin", "backup", "--partition", "dco", "--threshold", "2", "--out",
                 str(drill["work"] / "twice"), "--custodian", c, "--custodian", c,
                 state=drill["state"], check=False)
    assert out.returncode != 0 and "named twice" in out.stderr
    assert not any(label.startswith("keysvc-backup-")
                   for label in token_objects(drill["state"], "dco"))


def test_a_custodian_who_is_no_officer_is_refused_and_no_backup_key_is_left(restored):
    drill, _ = restored
    out = keysvc("admin", "backup", "--partition", "all", "--threshold", "2", "--out",
                 str(drill["work"] / "stranger"), "--custodian",
                 str(drill["custodians"][0][0]), "--custodian",
                 str(drill["state"] / "pki" / "auditor.pem"), state=drill["state"],
                 check=False)
    assert out.returncode != 0 and "not an enrolled officer" in out.stderr
    for p in ("s1sp", "dco", "admin"):
        assert not any(label.startswith("keysvc-backup-")
                       for label in token_objects(drill["state"], p))


def test_the_backup_key_cannot_be_changed_or_copied_with_the_user_pin(restored):
    """The ceremony's trusted key is an RSA public key (no secret in the token's files),
    made by the SO unmodifiable, uncopyable and for RSA-OAEP only: the user PIN cannot
    change it, keep a trusted copy of it, or wrap with another mechanism."""
    drill, _ = restored
    out = subprocess.run([sys.executable, "-c", f"""
import pkcs11
from pkcs11 import Attribute as A, ObjectClass
from keysvc import config
from keysvc.custody import backup as cb
from keysvc.devstate import point_softhsm_at
s = config.load(None, state_dir='{drill["state"]}')
point_softhsm_at(s)
cb.prepare(s.pkcs11_module, s.token_label('dco'), s.so_pin('dco'), 'probe')
lib = pkcs11.lib(s.pkcs11_module)
with lib.get_token(token_label=s.token_label('dco')).open(rw=True, user_pin=s.pin('dco')) as u:
    w = u.get_key(label='keysvc-backup-probe', object_class=ObjectClass.PUBLIC_KEY)
    print('trusted', bool(w[A.TRUSTED]), 'private', bool(w[A.PRIVATE]))
    for attr in (A.ENCRYPT, A.VERIFY, A.WRAP):
        try:
            w[attr] = not w[attr]; print('changed', attr)
        except pkcs11.exceptions.PKCS11Error:
            pass
    try:
        w.copy({{A.TOKEN: True}}); print('copied')
    except pkcs11.exceptions.PKCS11Error:
        pass
    try:  # CKA_ALLOWED_MECHANISMS: RSA-OAEP only
        w.wrap_key(u.get_key(label='storage-key'), mechanism=pkcs11.Mechanism.RSA_PKCS)
        print('wrapped with PKCS#1 v1.5')
    except pkcs11.exceptions.PKCS11Error:
        pass
    w.destroy()
"""], cwd=ROOT, env=server_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["trusted", "True", "private", "False"]


def test_a_backup_key_left_in_a_token_is_removed_and_audited_at_start(drill, tmp_path):
    """A ceremony killed between its two steps leaves the trusted key: the next start
    destroys it."""
    state = drill["state"]
    subprocess.run([sys.executable, "-c", f"""
from keysvc import config
from keysvc.custody import backup as cb
from keysvc.devstate import point_softhsm_at
s = config.load(None, state_dir='{state}')
point_softhsm_at(s)
cb.prepare(s.pkcs11_module, s.token_label('admin'), s.so_pin('admin'), 'killed')
"""], cwd=ROOT, env=server_env(), check=True)
    assert "keysvc-backup-killed" in token_objects(state, "admin")
    srv = start_server(state)
    try:
        assert "keysvc-backup-killed" not in token_objects(state, "admin")
        events = srv.as_("auditor").audit.ListAuditEvents(pb.ListAuditEventsRequest(
            action="custody.backup_key_removed", page_size=10)).events
        assert any("keysvc-backup-killed" in e.target for e in events)
    finally:
        srv.stop()


def test_restore_into_a_token_that_holds_keys_is_refused(restored):
    drill, _ = restored
    out = keysvc("admin", "restore", "--partition", "dco", *_shares(drill, "dco", [0, 1]),
                 state=drill["state"], check=False)
    assert out.returncode != 0 and "TOKEN_NOT_EMPTY" in out.stderr


def test_a_share_opened_with_another_custodians_key_is_refused(restored):
    drill, _ = restored
    args = _shares(drill, "dco", [0, 1])
    args[-1] = args[-1].split(":")[0] + ":" + str(drill["custodians"][0][1])
    out = keysvc("admin", "restore", "--partition", "dco", *args, state=drill["state"],
                 check=False)
    assert out.returncode != 0 and "SHARE_INVALID" in out.stderr


# =========================================================================== the key rules
def test_a_key_made_with_the_user_pin_cannot_wrap_a_long_lived_key(app):
    """CKA_WRAP_WITH_TRUSTED: only the SO can mark a key trusted, so the user PIN alone
    (which the server holds) takes no long-lived key out of the token."""
    from keysvc.partitions import STORAGE_KEY
    with app.partitions.s1sp.session() as session:
        s = session.raw
        mine = s.create_object({A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.AES,
                                A.VALUE: os.urandom(32), A.TOKEN: False, A.WRAP: True})
        with pytest.raises(pkcs11.exceptions.KeyNotWrappable):
            mine.wrap_key(s.get_key(label=STORAGE_KEY), mechanism=Mechanism.AES_KEY_WRAP)
        with pytest.raises(pkcs11.exceptions.PKCS11Error):
            s.create_object({A.CLASS: ObjectClass.SECRET_KEY, A.KEY_TYPE: KeyType.AES,
                             A.VALUE: os.urandom(32), A.TOKEN: False, A.WRAP: True,
                             A.TRUSTED: True})


def test_any_two_of_three_shares_rebuild_the_secret_and_one_does_not():
    secret = bytearray(os.urandom(32))
    parts = sh.split(secret, 2, 3)
    for pair in ([0, 1], [0, 2], [1, 2]):
        assert sh.combine([parts[i] for i in pair]) == secret
    assert sh.combine([parts[0]]) != secret


def test_threshold_below_two_is_refused():
    from keysvc.errors import KeysvcError
    with pytest.raises(KeysvcError) as e:
        sh.split(bytes(32), 1, 3)
    assert e.value.code == "INVALID_REQUEST"
