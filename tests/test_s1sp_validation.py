"""ProcessGroupInformation in process, one test per rule of the crypto profile's Validation.

Files come from the independent encoder (tests/support/encoder.py) with few installations
each. Every test has a fresh database; the SoftHSM2 token is shared by the whole run, so a
transport key goes into the token once (through the real import ceremony) and later tests
only register its `keys` row in their own database (`ensure_key`).

Other S1SP test modules import the helpers below (Kit, ensure_key, FACTORY...).
"""
from __future__ import annotations

import base64
import dataclasses
import os
import threading
from dataclasses import dataclass

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding
from lxml import etree
from sqlalchemy import func, select

from keysvc import keyadmin, s1sp
from keysvc import store as st
from keysvc.app import App
from keysvc.device_certificate import TrustStore
from keysvc.domain import normalise_eui64
from keysvc.errors import KeysvcError
from keysvc.hsm import keys as hk
from keysvc.records.keys import KeyRecord
from keysvc.results import GroupResult, InstallationResult, to_json
from tests.conftest import S1SP, unique
from tests.keyloading import load_aes_key, register_key_record, set_key_state
from tests.support.encoder import (
    NSMAP,
    ROOT_NON_DP,
    DeviceCertificateFactory,
    TestInstallation,
    duplicate,
    encrypt_file,
    kcv,
    plaintext_xml,
    random_installations,
    remove,
    set_attribute,
    set_text,
)

ORIGINATOR = "SMSO-LG-01"
RP_ORIGINATOR = "RP-SUPPLIER-07"
DP_GROUPS = ("EA", "EB", "EC")

# XPaths into a Migration Group Encrypted File (prefixes of encoder.NSMAP).
ENC_DATA = "/m:MigrationGroupEncryptedFile/m:EncryptedS1SPGroupInformation/xenc:EncryptedData"
CONTENT_METHOD = ENC_DATA + "/xenc:EncryptionMethod"
CONTENT_CV = ENC_DATA + "/xenc:CipherData/xenc:CipherValue"
EK = ENC_DATA + "/ds:KeyInfo/xenc:EncryptedKey"
EK_METHOD = EK + "/xenc:EncryptionMethod"
EK_NAME = EK + "/ds:KeyInfo/ds:KeyName"
EK_CV = EK + "/xenc:CipherData/xenc:CipherValue"

FACTORY = DeviceCertificateFactory("keysvc S1SP test device CA")
DCO_KEK = os.urandom(32)  # the master keys' KEK: the S1SP never needs it


# =========================================================================== key helpers
_IN_TOKEN: dict[str, KeyRecord] = {}  # name -> its record, for keys this run put in the token


def ensure_key(app: App, name: str, *, purpose: str, owner_id: str = ORIGINATOR,
               owner_type: str = "SMSO", aes: bytes | None = None,
               rsa_private: rsa.RSAPrivateKey | None = None,
               allowed: tuple[str, ...] = (ORIGINATOR,)) -> None:
    """Put a key in the token the first time (real ceremony), else register its row."""
    if name in _IN_TOKEN:
        register_key_record(app, _IN_TOKEN[name])
        return
    if aes is not None:
        load_aes_key(app, name, aes, purpose=purpose, owner_id=owner_id, owner_type=owner_type)
    else:
        keyadmin.register_existing_rsa_key(app, name=name, purpose=purpose,
                                           allowed_originators=list(allowed),
                                           private_key=rsa_private)
    _IN_TOKEN[name] = app.records.keys.get(name)


# One key of each kind for the whole module (each costs an RSA-3072 import job once).
KW_NAME, KW_KEY = unique("S1SP-TK-KW"), os.urandom(32)
RP_NAME, RP_KEY = unique("S1SP-TK-RP"), os.urandom(32)
DCO_NAME, DCO_KEY = unique("DCO-TK"), os.urandom(32)
EXPORT_NAME, EXPORT_KEY = unique("S1SP-EXPORT"), os.urandom(32)
RSA_NAME = unique("S1SP-RSA")
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


# =========================================================================== files
@dataclass
class Kit:
    """Builds encoder files for the keys above and runs them through the S1SP path."""

    app: App
    key_name: str = KW_NAME
    kek: object = KW_KEY
    originator_id: str = ORIGINATOR

    def installations(self, n: int = 3, group: str = "EA") -> list[TestInstallation]:
        return random_installations(n, group=group, cert_factory=FACTORY)

    def file(self, insts: list[TestInstallation], *, group: str = "EA",
             originator_type: str = "SMSO", originator_id: str | None = None,
             plaintext: bytes | None = None, master_keys: list | None = None,
             key_name: str | None = None, kek: object = None, file_id: str | None = None,
             content_key: bytes | None = None) -> bytes:
        return encrypt_file(
            file_id=file_id or unique("MGEF"), group_id=group, originator_type=originator_type,
            originator_id=originator_id or self.originator_id,
            plaintext=plaintext if plaintext is not None else plaintext_xml(group, insts),
            s1sp_key_name=key_name or self.key_name, s1sp_kek=kek or self.kek,
            dco_key_name="DCO-TK-UNUSED", dco_kek=DCO_KEK,
            master_keys=master_keys if master_keys is not None
            else [i.master_key_entry() for i in insts], content_key=content_key)

    def process(self, data: bytes) -> GroupResult:
        return s1sp.process_group_information(self.app, S1SP, data)

    def refused(self, data: bytes, code: str) -> KeysvcError:
        """A file-level failure: the code, and nothing stored."""
        with pytest.raises(KeysvcError) as ei:
            self.process(data)
        assert ei.value.code == code, ei.value.message
        assert count(self.app, st.device_keys) == 0
        assert count(self.app, st.migration_files) == 0
        return ei.value


@pytest.fixture()
def kit(app: App) -> Kit:
    app.trust = TrustStore(anchors=(FACTORY.ca_cert,))
    ensure_key(app, KW_NAME, aes=KW_KEY, purpose="S1SP_TRANSPORT")
    return Kit(app)


# =========================================================================== checks
def count(app: App, table, *where) -> int:
    with app.store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()


def device_rows(app: App, *where) -> list:
    with app.store.engine.connect() as conn:
        return conn.execute(select(st.device_keys).where(*where)).all()


def expected_kcvs(inst: TestInstallation, group: str) -> dict[str, str]:
    """'DEVICE/Name' -> CMAC KCV of every key the installation carries."""
    esme, gsme = normalise_eui64(inst.esme), inst.gsme and normalise_eui64(inst.gsme)
    if group in DP_GROUPS:
        out = {f"{esme}/AuthenticationKey": kcv(inst.auth_key),
               f"{esme}/EncryptionKey": kcv(inst.enc_key)}
        if inst.prepay_key is not None:
            out[f"{esme}/PrepaymentKey"] = kcv(inst.prepay_key)
        if gsme and inst.gsme_prepay_key is not None:
            out[f"{gsme}/PrepaymentKey"] = kcv(inst.gsme_prepay_key)
        return out
    out = {f"{esme}/{n}": kcv(k) for n, k in inst.esme_secret_keys().items()}
    if gsme:
        out.update({f"{gsme}/{n}": kcv(k) for n, k in inst.gsme_secret_keys.items()})
    return out


def by_chf(result: GroupResult) -> dict[str, InstallationResult]:
    return {i.chf_identifier: i for i in result.installations}


def codes(r: InstallationResult) -> set[str]:
    return {p.code for p in r.problems}


def assert_accepted(app: App, r: InstallationResult, inst: TestInstallation,
                    group: str) -> None:
    want = expected_kcvs(inst, group)
    assert r.status == "ACCEPTED", r.problems
    assert r.problems == ()
    assert {f"{k.device_id}/{k.name}": k.kcv for k in r.keys} == want
    for k in r.keys:
        if group in DP_GROUPS:
            assert k.role == s1sp.ROLE_OF[k.name]
        else:
            assert k.role == "SECRET"
    stored = device_rows(app, st.device_keys.c.chf_identifier == r.chf_identifier)
    assert {f"{row.device_id}/{row.name}": row.kcv for row in stored} == want


def assert_rejected(app: App, r: InstallationResult, *want_codes: str) -> None:
    assert r.status == "REJECTED"
    assert codes(r) == set(want_codes), r.problems
    assert r.keys == ()
    assert device_rows(app, st.device_keys.c.chf_identifier == r.chf_identifier) == []
    for device in (r.esme_device_id, r.gsme_device_id):
        if device:
            assert device_rows(app, st.device_keys.c.device_id == device) == []


def check_one_rejected(kit: Kit, insts: list[TestInstallation], result: GroupResult,
                       bad: int, *want_codes: str, group: str = "EA") -> InstallationResult:
    """Installation `bad` REJECTED with exactly `want_codes`; every other one ACCEPTED."""
    assert len(result.installations) == len(insts)
    for i, (inst, r) in enumerate(zip(insts, result.installations)):
        if i == bad:
            assert_rejected(kit.app, r, *want_codes)
        else:
            assert r.chf_identifier == normalise_eui64(inst.chf)
            assert_accepted(kit.app, r, inst, group)
    assert result.rejected_count == 1 and result.accepted_count == len(insts) - 1
    return result.installations[bad]


def cipher_value(data: bytes, path: str) -> bytes:
    return base64.b64decode(etree.fromstring(data).xpath(path, namespaces=NSMAP)[0].text)


def with_cipher_value(data: bytes, path: str, raw: bytes) -> bytes:
    return set_text(data, path, base64.b64encode(raw).decode())


def flip(raw: bytes, index: int, bit: int = 0x01) -> bytes:
    b = bytearray(raw)
    b[index] ^= bit
    return bytes(b)


# =========================================================================== key transport
def test_kw_aes256_key_transport_is_accepted(kit):
    insts = kit.installations(2)
    result = kit.process(kit.file(insts))
    for inst, r in zip(insts, result.installations):
        assert_accepted(kit.app, r, inst, "EA")
    assert count(kit.app, st.migration_files) == 1


def test_rsa_oaep_mgf1p_key_transport_is_accepted(kit):
    ensure_key(kit.app, RSA_NAME, purpose="S1SP_TRANSPORT", rsa_private=RSA_KEY)
    insts = kit.installations(2)
    data = kit.file(insts, key_name=RSA_NAME, kek=RSA_KEY.public_key())
    assert b"rsa-oaep-mgf1p" in data
    result = kit.process(data)
    for inst, r in zip(insts, result.installations):
        assert_accepted(kit.app, r, inst, "EA")


@pytest.mark.parametrize("uri", [
    "http://www.w3.org/2001/04/xmlenc#kw-aes128",
    "http://www.w3.org/2001/04/xmlenc#rsa-1_5",
    "http://www.w3.org/2009/xmlenc11#rsa-oaep",
    "urn:example:no-such-algorithm",
])
def test_unknown_key_transport_algorithm_is_unsupported_algorithm(kit, uri):
    data = set_attribute(kit.file(kit.installations(1)), EK_METHOD, "Algorithm", uri)
    err = kit.refused(data, "UNSUPPORTED_ALGORITHM")
    assert err.status == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("uri", [
    "http://www.w3.org/2001/04/xmlenc#aes256-cbc",
    "http://www.w3.org/2009/xmlenc11#aes128-gcm",
    "http://www.w3.org/2009/xmlenc11#aes192-gcm",
])
def test_content_encryption_other_than_aes256_gcm_is_unsupported_algorithm(kit, uri):
    data = set_attribute(kit.file(kit.installations(1)), CONTENT_METHOD, "Algorithm", uri)
    kit.refused(data, "UNSUPPORTED_ALGORITHM")


def test_unknown_key_name_is_unknown_transport_key(kit):
    data = set_text(kit.file(kit.installations(1)), EK_NAME, unique("NO-SUCH-KEY"))
    err = kit.refused(data, "UNKNOWN_TRANSPORT_KEY")
    assert err.status == grpc.StatusCode.FAILED_PRECONDITION


def test_disabled_transport_key_is_transport_key_disabled(kit):
    set_key_state(kit.app, KW_NAME, "DISABLED")
    kit.refused(kit.file(kit.installations(1)), "TRANSPORT_KEY_DISABLED")


def test_dco_transport_key_named_for_the_content_key_is_wrong_key_purpose(kit):
    ensure_key(kit.app, DCO_NAME, aes=DCO_KEY, purpose="DCO_TRANSPORT")
    data = kit.file(kit.installations(1), key_name=DCO_NAME, kek=DCO_KEY)
    kit.refused(data, "WRONG_KEY_PURPOSE")


def test_rsa_key_named_with_kw_aes256_is_wrong_key_purpose(kit):
    ensure_key(kit.app, RSA_NAME, purpose="S1SP_TRANSPORT", rsa_private=RSA_KEY)
    data = kit.file(kit.installations(1), key_name=RSA_NAME, kek=os.urandom(32))
    kit.refused(data, "WRONG_KEY_PURPOSE")


def test_transport_key_owned_by_another_originator_is_originator_not_permitted(kit):
    data = kit.file(kit.installations(1), originator_id="SMSO-OTHER-99")
    kit.refused(data, "ORIGINATOR_NOT_PERMITTED")


def test_rsa_key_not_registered_for_the_originator_is_originator_not_permitted(kit):
    ensure_key(kit.app, RSA_NAME, purpose="S1SP_TRANSPORT", rsa_private=RSA_KEY)
    data = kit.file(kit.installations(1), key_name=RSA_NAME, kek=RSA_KEY.public_key(),
                    originator_id="SMSO-OTHER-99")
    kit.refused(data, "ORIGINATOR_NOT_PERMITTED")


@pytest.mark.parametrize("transport", ["kw", "oaep"])
@pytest.mark.parametrize("where", [0, -1])
def test_corrupted_encrypted_key_is_key_unwrap_failed(kit, transport, where):
    kwargs = {}
    if transport == "oaep":
        ensure_key(kit.app, RSA_NAME, purpose="S1SP_TRANSPORT", rsa_private=RSA_KEY)
        kwargs = {"key_name": RSA_NAME, "kek": RSA_KEY.public_key()}
    data = kit.file(kit.installations(1), **kwargs)
    data = with_cipher_value(data, EK_CV, flip(cipher_value(data, EK_CV), where, 0x80))
    kit.refused(data, "KEY_UNWRAP_FAILED")


@pytest.mark.parametrize("transport", ["kw", "oaep"])
@pytest.mark.parametrize("size", [16, 24])
def test_content_key_not_256_bits_is_key_unwrap_failed(kit, transport, size):
    kwargs = {}
    if transport == "oaep":
        ensure_key(kit.app, RSA_NAME, purpose="S1SP_TRANSPORT", rsa_private=RSA_KEY)
        kwargs = {"key_name": RSA_NAME, "kek": RSA_KEY.public_key()}
    data = kit.file(kit.installations(1), content_key=os.urandom(size), **kwargs)
    kit.refused(data, "KEY_UNWRAP_FAILED")


@pytest.mark.parametrize("path,name,value", [
    ("//m:MigrationFileID", None, "has spaces"),
    ("//m:MigrationFileID", None, "X" * 65),
    ("//m:MigrationHeader/m:GroupID", None, "ZZ"),
    ("//m:OriginatorType", None, "Supplier"),
    ("//m:OriginatorID", None, ""),
    ("//m:CreationDateTime", None, "yesterday"),
    (ENC_DATA, "Type", "http://www.w3.org/2001/04/xmlenc#Content"),
])
def test_invalid_header_or_encrypted_data_is_schema_invalid(kit, path, name, value):
    data = kit.file(kit.installations(1))
    data = set_text(data, path, value) if name is None else set_attribute(data, path, name,
                                                                            value)
    err = kit.refused(data, "SCHEMA_INVALID")
    assert err.status == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("mutate", [
    pytest.param(lambda d: remove(d, EK), id="no-encrypted-key"),
    pytest.param(lambda d: remove(d, "//m:EncryptedMasterKey"), id="no-master-keys"),
    pytest.param(lambda d: remove(d, "//m:EncryptedS1SPGroupInformation"), id="no-group-info"),
    pytest.param(lambda d: duplicate(d, "//m:MigrationHeader"), id="two-headers"),
])
def test_file_missing_a_part_is_schema_invalid(kit, mutate):
    kit.refused(mutate(kit.file(kit.installations(1))), "SCHEMA_INVALID")


@pytest.mark.parametrize("where", [
    pytest.param(0, id="iv"), pytest.param(12, id="ciphertext-first"),
    pytest.param(-17, id="ciphertext-last"), pytest.param(-1, id="tag"),
])
def test_flipped_iv_ciphertext_or_tag_bit_is_decryption_failed(kit, where):
    data = kit.file(kit.installations(1))
    data = with_cipher_value(data, CONTENT_CV, flip(cipher_value(data, CONTENT_CV), where))
    err = kit.refused(data, "DECRYPTION_FAILED")
    assert err.status == grpc.StatusCode.FAILED_PRECONDITION


def test_cipher_value_shorter_than_iv_and_tag_is_decryption_failed(kit):
    data = with_cipher_value(kit.file(kit.installations(1)), CONTENT_CV, os.urandom(27))
    kit.refused(data, "DECRYPTION_FAILED")


def test_base64_wrapped_over_lines_is_accepted(kit):
    """xmlsec1 and most xmlenc tools break base64 into 64/76-character lines."""
    insts = kit.installations(1)
    data = kit.file(insts)
    text = base64.b64encode(cipher_value(data, CONTENT_CV)).decode()
    data = set_text(data, CONTENT_CV, "\n" + "\n".join(text[i:i + 64]
                                                       for i in range(0, len(text), 64)) + "\n")
    assert_accepted(kit.app, kit.process(data).installations[0], insts[0], "EA")


# =========================================================================== originators
@pytest.fixture()
def rp_kit(kit) -> Kit:
    ensure_key(kit.app, RP_NAME, aes=RP_KEY, purpose="S1SP_TRANSPORT", owner_id=RP_ORIGINATOR,
               owner_type="REQUESTING_PARTY")
    return Kit(kit.app, RP_NAME, RP_KEY, RP_ORIGINATOR)


@pytest.mark.parametrize("group", ["EA", "AA"])
def test_group_other_than_eb_ec_from_requesting_party_is_originator_not_permitted(rp_kit,
                                                                                   group):
    data = rp_kit.file(rp_kit.installations(1, group), group=group,
                       originator_type="RequestingParty")
    rp_kit.refused(data, "ORIGINATOR_NOT_PERMITTED")


@pytest.mark.parametrize("group", ["EB", "EC"])
@pytest.mark.parametrize("originator_type", ["SMSO", "RequestingParty"])
def test_eb_and_ec_from_smso_or_requesting_party_are_accepted(kit, rp_kit, group,
                                                              originator_type):
    k = rp_kit if originator_type == "RequestingParty" else kit
    insts = k.installations(2, group)
    result = k.process(k.file(insts, group=group, originator_type=originator_type))
    assert result.group_id == group and result.originator_id == k.originator_id
    for inst, r in zip(insts, result.installations):
        assert_accepted(k.app, r, inst, group)


# =========================================================================== plaintext
def test_plaintext_root_not_the_one_the_group_id_requires_is_plaintext_root_mismatch(kit):
    insts = kit.installations(1)
    kit.refused(kit.file(insts, plaintext=plaintext_xml("EA", insts, root=ROOT_NON_DP)),
                "PLAINTEXT_ROOT_MISMATCH")


def test_dp_root_for_an_aa_group_is_plaintext_root_mismatch(kit):
    insts = kit.installations(1, "EA")
    plain = plaintext_xml("AA", insts, root="DecryptedS1SPDPGroupInformation")
    kit.refused(kit.file(insts, group="AA", plaintext=plain), "PLAINTEXT_ROOT_MISMATCH")


def test_plaintext_group_id_other_than_the_header_is_group_id_mismatch(kit):
    insts = kit.installations(1, "EA")
    kit.refused(kit.file(insts, group="EB", plaintext=plaintext_xml("EA", insts)),
                "GROUP_ID_MISMATCH")


@pytest.mark.parametrize("mutate", [
    pytest.param(lambda p: remove(p, "//m:ESMEDetail"), id="no-esme-detail"),
    pytest.param(lambda p: remove(p, "//m:DeviceCertificate"), id="no-certificate"),
    pytest.param(lambda p: duplicate(p, "//m:CHFIdentifier"), id="two-chf"),
    pytest.param(lambda p: set_text(p, "//m:EncryptionKey", "AB" * 40), id="key-too-long"),
    pytest.param(lambda p: p.replace(b"</Installation>", b"<Extra/></Installation>", 1),
                 id="unknown-element"),
    pytest.param(lambda p: p.replace(b"urn:keysvc:smets1:migration:1.2", b"urn:other", 1),
                 id="other-namespace"),
])
def test_plaintext_not_schema_valid_is_schema_invalid(kit, mutate):
    insts = kit.installations(2)
    kit.refused(kit.file(insts, plaintext=mutate(plaintext_xml("EA", insts))), "SCHEMA_INVALID")


def test_plaintext_not_well_formed_is_malformed_xml(kit):
    insts = kit.installations(1)
    kit.refused(kit.file(insts, plaintext=plaintext_xml("EA", insts)[:-20]), "MALFORMED_XML")


def test_file_level_failure_after_earlier_files_stores_nothing_more(kit):
    insts = kit.installations(2)
    kit.process(kit.file(insts))
    rows, files = count(kit.app, st.device_keys), count(kit.app, st.migration_files)
    bad = kit.installations(2)
    with pytest.raises(KeysvcError) as ei:
        kit.process(kit.file(bad, group="EB", plaintext=plaintext_xml("EA", bad)))
    assert ei.value.code == "GROUP_ID_MISMATCH"
    assert (count(kit.app, st.device_keys), count(kit.app, st.migration_files)) == (rows, files)
    for inst in bad:
        assert device_rows(kit.app, st.device_keys.c.device_id == inst.esme) == []


def test_file_id_of_a_refused_file_can_be_sent_again_corrected(kit):
    insts = kit.installations(2)
    file_id = unique("MGEF")
    kit.refused(kit.file(insts, file_id=file_id, originator_id="SMSO-OTHER-99"),
                "ORIGINATOR_NOT_PERMITTED")
    result = kit.process(kit.file(insts, file_id=file_id))
    assert result.accepted_count == 2


# =========================================================================== installations
@pytest.mark.parametrize("field", ["chf", "esme", "gsme"])
@pytest.mark.parametrize("bad", ["00-DB-12-34-56-78-9A", "00:DB:12:34:56:78:9A:BC",
                                 "00-DB-12-34-56-78-9A-BG", "00DB-1234-5678-9ABC",
                                 "00-DB-12-34-56-78-9A-BC-DE", ""])
def test_malformed_eui64_is_invalid_eui64(kit, field, bad):
    insts = kit.installations(3)
    assert insts[0].gsme is not None
    setattr(insts[0], field, bad)  # in the plaintext and its MasterKeyEntry alike
    r = check_one_rejected(kit, insts, kit.process(kit.file(insts)), 0, "INVALID_EUI64")
    assert any(p.code == "INVALID_EUI64" and p.field.endswith(
        {"chf": "CHFIdentifier", "esme": "ESMEDetail/DeviceID",
         "gsme": "GSMEDetail/DeviceID"}[field]) for p in r.problems), r.problems


def test_a_malformed_esme_id_does_not_unpair_a_chf_written_unseparated(kit):
    """Each identifier is matched in its own normal form: the installation is rejected for
    its DeviceID alone, and its MasterKeyEntry is not reported as an orphan."""
    insts = kit.installations(3)
    insts[0].chf = insts[0].chf.replace("-", "").lower()
    insts[0].esme = "not-an-eui-64"  # in the plaintext and its MasterKeyEntry alike
    check_one_rejected(kit, insts, kit.process(kit.file(insts)), 0, "INVALID_EUI64")


def test_lower_case_and_unseparated_eui64_are_accepted_and_normalised(kit):
    insts = kit.installations(2)
    canon = [(i.chf, i.esme, i.gsme) for i in insts]
    insts[0].chf = insts[0].chf.replace("-", "").lower()
    insts[0].esme = insts[0].esme.lower()
    insts[0].gsme = insts[0].gsme.replace("-", "")
    insts[1].chf = insts[1].chf.lower()
    result = kit.process(kit.file(insts))
    for inst, (chf, esme, gsme), r in zip(insts, canon, result.installations):
        assert (r.chf_identifier, r.esme_device_id, r.gsme_device_id) == (chf, esme, gsme or "")
        assert_accepted(kit.app, r, inst, "EA")
    assert {row.device_id for row in device_rows(kit.app)} == \
        {x for c in canon for x in c[1:] if x}
    # and a lookup spelled the same loose way finds them
    assert s1sp.verify_prepayment_key(kit.app, insts[0].esme, kcv(insts[0].prepay_key))


@pytest.mark.parametrize("what", ["chf", "esme", "gsme", "gsme-is-other-esme"])
def test_repeated_identifier_is_duplicate_identifier_for_every_holder(kit, what):
    insts = kit.installations(4)
    a, b = insts[0], insts[1]
    assert a.gsme and b.gsme
    if what == "chf":
        b.chf = a.chf
        b.certificate_der = FACTORY(a.chf)
    elif what == "esme":
        b.esme = a.esme
    elif what == "gsme":
        b.gsme = a.gsme
    else:
        b.gsme = a.esme
    result = kit.process(kit.file(insts))
    assert [r.status for r in result.installations] == ["REJECTED", "REJECTED", "ACCEPTED",
                                                        "ACCEPTED"]
    for r in result.installations[:2]:
        assert codes(r) == {"DUPLICATE_IDENTIFIER"}, r.problems
        assert r.keys == ()
    for inst, r in zip(insts[2:], result.installations[2:]):
        assert_accepted(kit.app, r, inst, "EA")
    assert count(kit.app, st.device_keys, st.device_keys.c.device_id.in_(
        [x for i in insts[:2] for x in (i.esme, i.gsme)])) == 0


@pytest.mark.parametrize("what", ["gsme-is-own-esme", "esme-is-own-chf"])
def test_identifier_repeated_within_one_installation_is_duplicate_identifier(kit, what):
    insts = kit.installations(2)
    if what == "gsme-is-own-esme":
        insts[0].gsme = insts[0].esme
    else:
        insts[0].esme = insts[0].chf
    check_one_rejected(kit, insts, kit.process(kit.file(insts)), 0, "DUPLICATE_IDENTIFIER")


def test_installation_without_master_key_entry_is_master_key_entry_missing(kit):
    insts = kit.installations(3)
    entries = [i.master_key_entry() for i in insts if i is not insts[1]]
    check_one_rejected(kit, insts, kit.process(kit.file(insts, master_keys=entries)), 1,
                       "MASTER_KEY_ENTRY_MISSING")


def test_master_key_entry_for_another_esme_is_master_key_entry_missing(kit):
    insts = kit.installations(2)
    other = random_installations(1)[0]
    entries = [insts[0].master_key_entry(), (insts[1].chf, other.esme, insts[1].master_key)]
    result = kit.process(kit.file(insts, master_keys=entries))
    check_one_rejected(kit, insts, GroupResult(*dataclasses.astuple(result)[:3],
                                               result.installations[:2]),
                       1, "MASTER_KEY_ENTRY_MISSING")
    stray = result.installations[2:]  # and the entry itself names no Installation
    assert [(r.chf_identifier, r.esme_device_id, r.status, codes(r)) for r in stray] == [
        (insts[1].chf, other.esme, "REJECTED", {"INSTALLATION_MISSING"})]


def test_master_key_entry_for_an_esme_no_installation_has_is_installation_missing(kit):
    """The CHF is known, but no Installation has this CHF with this ESME."""
    insts = kit.installations(2)
    stray_esme = random_installations(1)[0].esme
    entries = [i.master_key_entry() for i in insts] + [(insts[0].chf, stray_esme,
                                                        os.urandom(16))]
    result = kit.process(kit.file(insts, master_keys=entries))
    assert len(result.installations) == 3
    for inst, r in zip(insts, result.installations):
        assert_accepted(kit.app, r, inst, "EA")
    stray = result.installations[2]
    assert (stray.chf_identifier, stray.esme_device_id, stray.status, codes(stray)) == \
        (insts[0].chf, stray_esme, "REJECTED", {"INSTALLATION_MISSING"})
    assert device_rows(kit.app, st.device_keys.c.device_id == stray_esme) == []


def test_repeated_master_key_entry_is_duplicate_identifier(kit):
    insts = kit.installations(2)
    entries = [i.master_key_entry() for i in insts] + [insts[0].master_key_entry()]
    check_one_rejected(kit, insts, kit.process(kit.file(insts, master_keys=entries)), 0,
                       "DUPLICATE_IDENTIFIER")


def test_master_key_entry_without_installation_is_installation_missing(kit):
    insts = kit.installations(2)
    extra = random_installations(1)[0]
    entries = [i.master_key_entry() for i in insts] + [extra.master_key_entry()]
    result = kit.process(kit.file(insts, master_keys=entries))
    assert len(result.installations) == 3
    for inst, r in zip(insts, result.installations):
        assert_accepted(kit.app, r, inst, "EA")
    orphan = result.installations[2]
    assert (orphan.chf_identifier, orphan.esme_device_id) == (extra.chf, extra.esme)
    assert_rejected(kit.app, orphan, "INSTALLATION_MISSING")
    assert (result.accepted_count, result.rejected_count) == (2, 1)


@pytest.mark.parametrize("element", ["AuthenticationKey", "EncryptionKey", "PrepaymentKey"])
def test_ea_without_a_high_level_association_key_is_missing_key(kit, element):
    insts = kit.installations(3)
    plain = remove(plaintext_xml("EA", insts),
                   f"//m:Installation[2]/m:ESMEDetail/m:HighLevelAssociation/m:{element}")
    r = check_one_rejected(kit, insts, kit.process(kit.file(insts, plaintext=plain)), 1,
                           "MISSING_KEY")
    assert r.problems[0].field == f"{normalise_eui64(insts[1].esme)}/{element}"


def test_eb_and_ec_without_esme_prepayment_key_are_accepted(kit):
    for group in ("EB", "EC"):
        insts = kit.installations(2, group)
        assert insts[0].prepay_key is not None and insts[1].prepay_key is None
        result = kit.process(kit.file(insts, group=group))
        for inst, r in zip(insts, result.installations):
            assert_accepted(kit.app, r, inst, group)
        assert device_rows(kit.app, st.device_keys.c.device_id == insts[1].esme,
                           st.device_keys.c.role == "PREPAYMENT") == []
        with pytest.raises(KeysvcError) as ei:
            s1sp.verify_prepayment_key(kit.app, insts[1].esme, "0000000000")
        assert ei.value.code == "DEVICE_KEY_NOT_FOUND"


BAD_KEYS = [
    pytest.param("00" * 16, id="all-zero"),
    pytest.param("A5" * 16, id="all-bytes-equal"),
    pytest.param("0123456789ABCDEF0123456789ABCD", id="30-hex"),
    pytest.param("0123456789ABCDEF0123456789ABCDEF01", id="34-hex"),
    pytest.param("0123456789ABCDEF" * 4, id="64-hex"),
    pytest.param("0123456789ABCDEF0123456789ABCDEG", id="not-hex"),
    pytest.param("0123456789ABCDEF 123456789ABCDEF", id="inner-space"),
]


@pytest.mark.parametrize("element", ["AuthenticationKey", "EncryptionKey", "PrepaymentKey"])
@pytest.mark.parametrize("value", BAD_KEYS)
def test_invalid_esme_key_is_invalid_key(kit, element, value):
    insts = kit.installations(3)
    plain = set_text(plaintext_xml("EA", insts),
                     f"//m:Installation[2]/m:ESMEDetail/m:HighLevelAssociation/m:{element}",
                     value)
    r = check_one_rejected(kit, insts, kit.process(kit.file(insts, plaintext=plain)), 1,
                           "INVALID_KEY")
    for p in r.problems:
        assert value not in p.message and value not in p.field


@pytest.mark.parametrize("value", BAD_KEYS)
def test_invalid_gsme_prepay_details_prepayment_key_is_invalid_key(kit, value):
    insts = kit.installations(3)
    assert insts[0].gsme_prepay_key is not None
    plain = set_text(plaintext_xml("EA", insts),
                     "//m:Installation[1]/m:GSMEDetail/m:PrePayDetails/m:PrepaymentKey", value)
    check_one_rejected(kit, insts, kit.process(kit.file(insts, plaintext=plain)), 0,
                       "INVALID_KEY")


def test_gsme_prepay_details_without_a_prepayment_key_is_missing_key(kit):
    insts = kit.installations(3)
    assert insts[0].gsme_prepay_key is not None
    plain = remove(plaintext_xml("EA", insts),
                   "//m:Installation[1]/m:GSMEDetail/m:PrePayDetails/m:PrepaymentKey")
    r = check_one_rejected(kit, insts, kit.process(kit.file(insts, plaintext=plain)), 0,
                           "MISSING_KEY")
    assert r.problems[0].field == f"{normalise_eui64(insts[0].gsme)}/PrepaymentKey"


@pytest.mark.parametrize("value", BAD_KEYS[:3])
def test_invalid_aa_secret_key_is_invalid_key(kit, value):
    insts = kit.installations(2, "AA")
    plain = set_text(plaintext_xml("AA", insts),
                     "//m:Installation[2]/m:ESMEDetail/m:SecretKey[2]", value)
    check_one_rejected(kit, insts, kit.process(kit.file(insts, group="AA", plaintext=plain)),
                       1, "INVALID_KEY", group="AA")


def test_key_with_surrounding_whitespace_or_lower_case_is_accepted(kit):
    insts = kit.installations(1)
    plain = set_text(plaintext_xml("EA", insts), "//m:AuthenticationKey",
                     f"\n  {insts[0].auth_key.hex()}  \n")
    assert_accepted(kit.app, kit.process(kit.file(insts, plaintext=plain)).installations[0],
                    insts[0], "EA")


def test_device_certificate_naming_another_chf_is_device_certificate_invalid(kit):
    insts = kit.installations(3)
    insts[1].certificate_der = FACTORY(insts[0].chf)
    r = check_one_rejected(kit, insts, kit.process(kit.file(insts)), 1,
                           "DEVICE_CERTIFICATE_INVALID")
    assert "CERT_DEVICE_MISMATCH" in r.problems[0].message
    assert r.device_certificate is not None and not r.device_certificate.valid
    assert "CERT_DEVICE_MISMATCH" in {p.code for p in r.device_certificate.problems}
    assert r.device_certificate.device_id == insts[0].chf


def test_device_certificate_from_an_untrusted_ca_is_device_certificate_invalid(kit):
    insts = kit.installations(2)
    insts[0].certificate_der = DeviceCertificateFactory("Untrusted CA")(insts[0].chf)
    r = check_one_rejected(kit, insts, kit.process(kit.file(insts)), 0,
                           "DEVICE_CERTIFICATE_INVALID")
    assert "CERT_CHAIN" in r.problems[0].message
    assert "CERT_CHAIN" in {p.code for p in r.device_certificate.problems}


def test_device_certificate_not_base64_der_is_device_certificate_invalid(kit):
    insts = kit.installations(2)
    plain = set_text(plaintext_xml("EA", insts), "//m:Installation[1]/m:DeviceCertificate",
                     "not base64 at all!")
    r = check_one_rejected(kit, insts, kit.process(kit.file(insts, plaintext=plain)), 0,
                           "DEVICE_CERTIFICATE_INVALID")
    assert "CERT_PARSE" in r.problems[0].message


def test_accepted_installation_carries_its_valid_certificate_verdict(kit):
    insts = kit.installations(1)
    r = kit.process(kit.file(insts)).installations[0]
    assert r.device_certificate.valid and r.device_certificate.problems == ()
    assert r.device_certificate.device_id == insts[0].chf


def test_aa_secret_key_with_repeated_name_is_duplicate_identifier(kit):
    insts = kit.installations(3, "AA")
    plain = duplicate(plaintext_xml("AA", insts), "//m:Installation[2]/m:ESMEDetail/m:SecretKey[1]")
    check_one_rejected(kit, insts, kit.process(kit.file(insts, group="AA", plaintext=plain)),
                       1, "DUPLICATE_IDENTIFIER", group="AA")


def test_aa_gsme_secret_keys_are_stored_under_the_gsme(kit):
    insts = kit.installations(2, "AA")
    insts[0].gsme_secret_keys = {"PrepaymentKey": os.urandom(16), "Other": os.urandom(16)}
    result = kit.process(kit.file(insts, group="AA"))
    for inst, r in zip(insts, result.installations):
        assert_accepted(kit.app, r, inst, "AA")
    assert {row.name for row in device_rows(kit.app, st.device_keys.c.device_id ==
                                            insts[0].gsme)} == {"PrepaymentKey", "Other"}


def test_several_problems_of_one_installation_are_all_reported(kit):
    insts = kit.installations(2)
    insts[0].auth_key = bytes(16)
    insts[0].prepay_key = None
    insts[0].certificate_der = FACTORY(insts[1].chf)
    r = check_one_rejected(kit, insts, kit.process(kit.file(insts)), 0, "INVALID_KEY",
                           "MISSING_KEY", "DEVICE_CERTIFICATE_INVALID")
    assert len(r.problems) == 3


def test_device_already_keyed_by_an_earlier_file_is_duplicate_identifier(kit):
    first = kit.installations(2)
    kit.process(kit.file(first))
    again = kit.installations(2)
    again[1].esme = first[0].esme
    again[1].prepay_key = os.urandom(16)
    result = kit.process(kit.file(again))
    assert_accepted(kit.app, result.installations[0], again[0], "EA")
    r = result.installations[1]
    assert r.status == "REJECTED" and codes(r) == {"DUPLICATE_IDENTIFIER"}, r.problems
    assert first[0].esme in r.problems[0].message  # names the device, and the earlier file
    assert device_rows(kit.app, st.device_keys.c.chf_identifier == again[1].chf) == []
    assert device_rows(kit.app, st.device_keys.c.device_id == again[1].gsme) == []
    assert {row.file_id for row in device_rows(kit.app, st.device_keys.c.device_id ==
                                               first[0].esme)} != {result.migration_file_id}
    # the device keeps the first file's key
    assert s1sp.verify_prepayment_key(kit.app, first[0].esme, kcv(first[0].prepay_key))
    assert not s1sp.verify_prepayment_key(kit.app, first[0].esme, kcv(again[1].prepay_key))


def test_two_files_keying_one_device_at_once_store_it_once_and_reject_it_in_the_other(
        kit, monkeypatch):
    """Two files (two replicas) both pass the already-stored check before either commits."""
    a, b = kit.installations(2), kit.installations(2)
    b[1].esme = a[0].esme
    files = [kit.file(a), kit.file(b)]
    barrier = threading.Barrier(2)
    waited: set[int] = set()
    check = s1sp._reject_devices_already_stored

    def check_then_meet(app, installations):
        check(app, installations)
        if threading.get_ident() not in waited:  # only the first check of each request
            waited.add(threading.get_ident())
            barrier.wait(timeout=30)
    monkeypatch.setattr(s1sp, "_reject_devices_already_stored", check_then_meet)
    out: list = [None, None]

    def send(i: int) -> None:
        try:
            out[i] = kit.process(files[i])
        except Exception as exc:  # kept for the assertion below
            out[i] = exc
    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(isinstance(o, GroupResult) for o in out), out
    ra, rb = out
    for inst, r in ((a[1], ra.installations[1]), (b[0], rb.installations[0])):
        assert_accepted(kit.app, r, inst, "EA")
    shared = [ra.installations[0], rb.installations[1]]
    assert sorted(r.status for r in shared) == ["ACCEPTED", "REJECTED"]
    loser = next(r for r in shared if r.status == "REJECTED")
    assert codes(loser) == {"DUPLICATE_IDENTIFIER"} and loser.keys == ()
    winner_file = (ra if ra.installations[0].status == "ACCEPTED" else rb).migration_file_id
    assert {row.file_id for row in device_rows(kit.app, st.device_keys.c.device_id ==
                                               a[0].esme)} == {winner_file}
    from tests.test_tree_seals import assert_only_stored_rows_share_trees
    assert_only_stored_rows_share_trees(kit.app, "device_keys")  # the loser sealed again
    assert device_rows(kit.app, st.device_keys.c.chf_identifier == loser.chf_identifier) == []
    # what each call returned is what is stored for it
    for r in out:
        assert kit.process(files[out.index(r)]) == r


# =========================================================================== idempotency
def test_same_file_id_and_bytes_returns_the_stored_result_and_stores_nothing_twice(kit):
    insts = kit.installations(3)
    insts[2].auth_key = bytes(16)  # a rejected installation is part of the result too
    data = kit.file(insts)
    first = kit.process(data)
    rows = sorted((r.device_id, r.role, r.name, r.wrapped, r.kcv) for r in device_rows(kit.app))
    assert (first.accepted_count, first.rejected_count) == (2, 1)
    for _ in range(2):
        assert kit.process(data) == first
    assert count(kit.app, st.migration_files) == 1
    assert sorted((r.device_id, r.role, r.name, r.wrapped, r.kcv)
                  for r in device_rows(kit.app)) == rows


def test_same_file_id_with_other_bytes_is_file_already_processed(kit):
    insts = kit.installations(2)
    file_id = unique("MGEF")
    kit.process(kit.file(insts, file_id=file_id))
    rows = count(kit.app, st.device_keys)
    for other in (kit.file(insts, file_id=file_id),                   # same content, new IV
                  kit.file(kit.installations(2), file_id=file_id)):   # other content
        with pytest.raises(KeysvcError) as ei:
            kit.process(other)
        assert ei.value.code == "FILE_ALREADY_PROCESSED"
        assert ei.value.status == grpc.StatusCode.ALREADY_EXISTS
    assert count(kit.app, st.device_keys) == rows
    assert count(kit.app, st.migration_files) == 1


# =========================================================================== secrets
def all_key_texts(insts: list[TestInstallation], *extra: bytes) -> list[str]:
    keys = [k for i in insts for k in (i.auth_key, i.enc_key, i.master_key, i.prepay_key,
                                       i.gsme_prepay_key, *i.secret_keys.values(),
                                       *i.gsme_secret_keys.values()) if k] + list(extra)
    return [t for k in keys for t in (k.hex().upper(), k.hex(),
                                      base64.b64encode(k).decode())]


def test_results_and_problem_messages_never_carry_key_text(kit):
    insts = kit.installations(3)
    insts[0].auth_key = b"\x3c" * 16
    bad_text = "0123456789ABCDEF0123456789ABCDEZ"
    plain = set_text(plaintext_xml("EA", insts), "//m:Installation[2]//m:EncryptionKey",
                     bad_text)
    content_key = os.urandom(32)
    result = kit.process(kit.file(insts, plaintext=plain, content_key=content_key))
    assert [r.status for r in result.installations] == ["REJECTED", "REJECTED", "ACCEPTED"]
    text = to_json(result) + repr(result)
    for secret in all_key_texts(insts, content_key, KW_KEY) + [bad_text, bad_text.lower()]:
        assert secret not in text


def test_schema_invalid_message_does_not_echo_an_over_long_key(kit):
    insts = kit.installations(2)
    long_key = insts[1].enc_key.hex().upper() * 2 + "AB"  # 66 characters > maxLength 64
    plain = set_text(plaintext_xml("EA", insts), "//m:Installation[2]//m:EncryptionKey",
                     long_key)
    err = kit.refused(kit.file(insts, plaintext=plain), "SCHEMA_INVALID")
    text = f"{err.message} {err} {err.metadata}"
    assert "EncryptionKey" in text  # names the element...
    for secret in all_key_texts(insts) + [long_key, long_key[:32], long_key[-32:]]:
        assert secret not in text      # ...never its value


@pytest.mark.parametrize("value", ["not a key", "A5" * 16])
def test_schema_invalid_message_does_not_echo_a_secret_key_name_or_value(kit, value):
    insts = kit.installations(1, "AA")
    plain = set_attribute(plaintext_xml("AA", insts), "//m:SecretKey[1]", "Name", "X" * 65)
    plain = set_text(plain, "//m:SecretKey[2]", value * 4)
    err = kit.refused(kit.file(insts, group="AA", plaintext=plain), "SCHEMA_INVALID")
    for secret in all_key_texts(insts) + [value * 4]:
        assert secret not in err.message


# =========================================================================== export
@pytest.fixture()
def export_key(kit) -> str:
    ensure_key(kit.app, EXPORT_NAME, aes=EXPORT_KEY, purpose="EXPORT", owner_id="S1SP",
               owner_type="S1SP")
    return EXPORT_NAME


def test_exported_device_keys_unwrap_under_the_export_key_to_the_device_keys(kit, export_key):
    insts = kit.installations(2)
    kit.process(kit.file(insts))
    inst = insts[0]
    out = s1sp.export_device_keys(kit.app, inst.esme, [], export_key)
    want = {"AuthenticationKey": inst.auth_key, "EncryptionKey": inst.enc_key,
            "PrepaymentKey": inst.prepay_key}
    assert {k.name for k in out} == set(want)
    for k in out:
        assert k.role == s1sp.ROLE_OF[k.name] and k.kcv == kcv(want[k.name])
        assert want[k.name] not in k.wrapped
        assert aes_key_unwrap_with_padding(EXPORT_KEY, k.wrapped) == want[k.name]
    gsme = s1sp.export_device_keys(kit.app, inst.gsme.lower(), ["PREPAYMENT"], export_key)
    assert [(k.role, k.name) for k in gsme] == [("PREPAYMENT", "PrepaymentKey")]
    assert aes_key_unwrap_with_padding(EXPORT_KEY, gsme[0].wrapped) == inst.gsme_prepay_key
    only = s1sp.export_device_keys(kit.app, inst.esme, ["ENCRYPTION"], export_key)
    assert [aes_key_unwrap_with_padding(EXPORT_KEY, k.wrapped) for k in only] == [inst.enc_key]


@pytest.mark.parametrize("name,code", [
    (KW_NAME, "WRONG_KEY_PURPOSE"),
    (DCO_NAME, "WRONG_KEY_PURPOSE"),
    ("NO-SUCH-EXPORT-KEY", "UNKNOWN_TRANSPORT_KEY"),
], ids=["s1sp-transport-key", "dco-transport-key", "unknown-key"])  # the names are random
def test_export_under_a_key_that_is_not_an_export_key_is_refused(kit, export_key, name, code):
    ensure_key(kit.app, DCO_NAME, aes=DCO_KEY, purpose="DCO_TRANSPORT")
    insts = kit.installations(1)
    kit.process(kit.file(insts))
    with pytest.raises(KeysvcError) as ei:
        s1sp.export_device_keys(kit.app, insts[0].esme, [], name)
    assert ei.value.code == code


def test_export_of_an_unknown_device_is_device_key_not_found(kit, export_key):
    with pytest.raises(KeysvcError) as ei:
        s1sp.export_device_keys(kit.app, "10-00-00-00-00-00-00-01", [], export_key)
    assert ei.value.code == "DEVICE_KEY_NOT_FOUND"
    assert ei.value.status == grpc.StatusCode.NOT_FOUND


def test_export_of_a_malformed_device_id_is_invalid_eui64(kit, export_key):
    with pytest.raises(KeysvcError) as ei:
        s1sp.export_device_keys(kit.app, "not-a-device", [], export_key)
    assert ei.value.code == "INVALID_EUI64"


# =========================================================================== verify
def test_verify_prepayment_key_matches_cmac_and_ecb_and_refuses_others(kit):
    insts = kit.installations(1)
    kit.process(kit.file(insts))
    esme, gsme = insts[0].esme, insts[0].gsme
    for device, key in ((esme, insts[0].prepay_key), (gsme, insts[0].gsme_prepay_key)):
        assert s1sp.verify_prepayment_key(kit.app, device, kcv(key), "CMAC")
        assert s1sp.verify_prepayment_key(kit.app, device, kcv(key, "ECB"), "ECB")
        assert s1sp.verify_prepayment_key(kit.app, device, kcv(key).lower(), "CMAC")
        assert not s1sp.verify_prepayment_key(kit.app, device, kcv(key, "ECB"), "CMAC")
        assert not s1sp.verify_prepayment_key(kit.app, device, kcv(insts[0].auth_key))
        with pytest.raises(KeysvcError) as ei:  # not a check value at all: a clear error
            s1sp.verify_prepayment_key(kit.app, device, "")
        assert ei.value.code == "INVALID_REQUEST"
    with pytest.raises(KeysvcError) as ei:
        s1sp.verify_prepayment_key(kit.app, "10-00-00-00-00-00-00-02", "0000000000")
    assert ei.value.code == "DEVICE_KEY_NOT_FOUND"


# =========================================================================== storage
def token_objects(app: App) -> int:
    with app.partitions.s1sp.session() as s:
        return len(list(s.raw.get_objects()))


def test_accepted_keys_are_stored_wrapped_and_leave_no_token_object(kit):
    insts = kit.installations(3)
    insts[2].enc_key = bytes(16)  # a rejected installation leaves nothing either
    data = kit.file(insts)
    before = token_objects(kit.app)
    result = kit.process(data)
    assert token_objects(kit.app) == before
    assert [r.status for r in result.installations] == ["ACCEPTED", "ACCEPTED", "REJECTED"]
    plain = {f"{normalise_eui64(i.esme)}/{n}": k for i in insts[:2]
             for n, k in (("AuthenticationKey", i.auth_key), ("EncryptionKey", i.enc_key),
                          ("PrepaymentKey", i.prepay_key))}
    plain.update({f"{i.gsme}/PrepaymentKey": i.gsme_prepay_key for i in insts[:2] if i.gsme})
    rows = device_rows(kit.app)
    assert {f"{r.device_id}/{r.name}" for r in rows} == set(plain)
    for r in rows:
        key = plain[f"{r.device_id}/{r.name}"]
        assert r.file_id == result.migration_file_id
        assert len(r.wrapped) == 24                    # RFC 3394 of a 128-bit key
        assert r.wrapped != key and key not in r.wrapped
        assert key.hex().encode() not in r.wrapped.lower()
        assert r.kcv == kcv(key)
    with kit.app.store.engine.connect() as conn:
        stored = conn.execute(select(st.migration_files.c.result)).scalar_one()
    for secret in all_key_texts(insts):
        assert secret not in stored
    # the idempotent replay and the verification leave no object behind either
    kit.process(data)
    assert s1sp.verify_prepayment_key(kit.app, insts[0].esme, kcv(insts[0].prepay_key))
    assert token_objects(kit.app) == before


def test_failed_files_leave_no_token_object(kit):
    insts = kit.installations(1)
    before = token_objects(kit.app)
    data = kit.file(insts)
    for bad, code in ((with_cipher_value(data, CONTENT_CV,
                                         flip(cipher_value(data, CONTENT_CV), -1)),
                       "DECRYPTION_FAILED"),
                      (kit.file(insts, content_key=os.urandom(16)), "KEY_UNWRAP_FAILED"),
                      (with_cipher_value(data, EK_CV, flip(cipher_value(data, EK_CV), 3)),
                       "KEY_UNWRAP_FAILED"),
                      (kit.file(insts, group="EB", plaintext=plaintext_xml("EA", insts)),
                       "GROUP_ID_MISMATCH")):
        kit.refused(bad, code)
    assert token_objects(kit.app) == before


def test_storage_key_leaves_the_token_only_under_a_trusted_key(kit):
    """Sensitive, and extractable only by the backup ceremony's CKA_TRUSTED key
    (tests/test_custody.py shows a key made with the user PIN cannot wrap it)."""
    from keysvc.partitions import STORAGE_KEY
    with kit.app.partitions.s1sp.session() as s:
        assert hk.key_attributes(s, STORAGE_KEY)["sensitive"]
        assert hk.custody_attributes(s, STORAGE_KEY) == {"extractable": True,
                                                         "wrap_with_trusted": True}

