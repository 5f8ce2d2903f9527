"""The schemas and the test encoder, checked against the outside examples and xmlsec1.

The examples were made by an independent reference encoder and xmlsec1 is a third
implementation, so agreement here means the encoder (which service tests rely on) and the
schemas (which the service relies on) read the profile the way others do.
"""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from functools import lru_cache
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap
from lxml import etree

from keysvc.schemas import GROUP_INFORMATION, MIGRATION_FILE, schema_path
from tests.support.encoder import (
    ALG_KW_AES256,
    ALG_RSA_OAEP_MGF1P,
    DUMMY_CERTIFICATE_DER,
    NSMAP,
    DeviceCertificateFactory,
    TestInstallation,
    build_file,
    duplicate,
    encrypt_file,
    kcv,
    plaintext_xml,
    random_installations,
    remove,
    set_attribute,
    set_text,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "spec" / "examples"
EXAMPLE_NAMES = ["ea-kw", "eb-oaep", "aa-kw"]
KW_EXAMPLES = ["ea-kw", "aa-kw"]

pytestmark = pytest.mark.skipif(not EXAMPLES.is_dir(), reason="shared/spec/examples not present")

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                          huge_tree=True)
_OAEP_SHA1 = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


# --------------------------------------------------------------------------- helpers

@lru_cache(maxsize=None)
def _schema(name: str) -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(str(schema_path(name)), _PARSER))


def _valid(name: str, xml: bytes) -> bool:
    return _schema(name).validate(etree.fromstring(xml, _PARSER).getroottree())


def _assert_valid(name: str, xml: bytes) -> None:
    schema = _schema(name)
    if not schema.validate(etree.fromstring(xml, _PARSER).getroottree()):
        pytest.fail(f"{name}: {schema.error_log}")


def _example(name: str) -> tuple[bytes, bytes, dict]:
    folder = EXAMPLES / name
    return ((folder / "file.xml").read_bytes(), (folder / "plain.xml").read_bytes(),
            json.loads((folder / "expect.json").read_text()))


def _keks(name: str) -> tuple[bytes | rsa.RSAPrivateKey, bytes | rsa.RSAPrivateKey]:
    """What a recipient holds: the shared transport key, or its RSA private key."""
    _, _, expect = _example(name)
    if expect["transport"] == "kw":
        return (bytes.fromhex(expect["s1sp_transport_key"]["hex"]),
                bytes.fromhex(expect["dco_transport_key"]["hex"]))
    return _rsa(EXAMPLES / name / "s1sp_rsa.pem"), _rsa(EXAMPLES / name / "dco_rsa.pem")


@lru_cache(maxsize=None)
def _rsa(path: Path) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def _unwrap(encrypted_key: etree._Element, kek: bytes | rsa.RSAPrivateKey) -> bytes:
    alg = encrypted_key.find("xenc:EncryptionMethod", NSMAP).get("Algorithm")
    wrapped = base64.b64decode(encrypted_key.findtext("xenc:CipherData/xenc:CipherValue",
                                                      namespaces=NSMAP))
    if alg == ALG_KW_AES256:
        assert isinstance(kek, bytes)
        return aes_key_unwrap(kek, wrapped)
    assert alg == ALG_RSA_OAEP_MGF1P and isinstance(kek, rsa.RSAPrivateKey)
    return kek.decrypt(wrapped, _OAEP_SHA1)


def _decrypt(file_xml: bytes, s1sp_kek: bytes | rsa.RSAPrivateKey) -> tuple[bytes, bytes, bytes]:
    """(plaintext, content key, IV) by the profile alone, with pyca/cryptography."""
    root = etree.fromstring(file_xml, _PARSER)
    (data,) = root.xpath("m:EncryptedS1SPGroupInformation/xenc:EncryptedData", namespaces=NSMAP)
    assert data.find("xenc:EncryptionMethod", NSMAP).get("Algorithm") == \
        "http://www.w3.org/2009/xmlenc11#aes256-gcm"
    content_key = _unwrap(data.find("ds:KeyInfo/xenc:EncryptedKey", NSMAP), s1sp_kek)
    blob = base64.b64decode(data.findtext("xenc:CipherData/xenc:CipherValue", namespaces=NSMAP))
    iv = blob[:12]
    return AESGCM(content_key).decrypt(iv, blob[12:], None), content_key, iv


def _master_keys(file_xml: bytes,
                 dco_kek: bytes | rsa.RSAPrivateKey) -> dict[str, tuple[str, bytes]]:
    root = etree.fromstring(file_xml, _PARSER)
    out = {}
    for entry in root.iterfind("m:EncryptedMasterKey/m:MasterKeyEntry", NSMAP):
        device = entry.findtext("m:DeviceID", namespaces=NSMAP)
        out[device] = (entry.findtext("m:CHFIdentifier", namespaces=NSMAP),
                       _unwrap(entry.find("xenc:EncryptedKey", NSMAP), dco_kek))
    return out


def _installations_from_example(name: str) -> list[TestInstallation]:
    """The example's installations rebuilt from expect.json (keys) and plain.xml (certificates)."""
    _, plain, expect = _example(name)
    certs = {}
    for inst in etree.fromstring(plain, _PARSER).iterfind("m:Installation", NSMAP):
        text = inst.findtext("m:DeviceCertificate", namespaces=NSMAP)
        if text is not None:
            certs[inst.findtext("m:CHFIdentifier", namespaces=NSMAP)] = base64.b64decode(text)
    out = []
    for item in expect["installations"]:
        keys = {k: bytes.fromhex(v["hex"]) for k, v in item["keys"].items()}
        esme, gsme = item["esme"], item.get("gsme")
        inst = TestInstallation(
            chf=item["chf"], esme=esme,
            auth_key=keys[f"{esme}/AuthenticationKey"], enc_key=keys[f"{esme}/EncryptionKey"],
            master_key=bytes.fromhex(expect["master_keys"][esme]["hex"]),
            prepay_key=keys.get(f"{esme}/PrepaymentKey"), gsme=gsme,
            gsme_prepay_key=keys.get(f"{gsme}/PrepaymentKey") if gsme else None,
            certificate_der=certs.get(item["chf"]))
        out.append(inst)
    return out


# --------------------------------------------------------------------------- (a) examples decrypt

@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_decrypts_to_its_plaintext(name: str) -> None:
    file_xml, plain, _ = _example(name)
    s1sp_kek, _ = _keks(name)
    plaintext, content_key, iv = _decrypt(file_xml, s1sp_kek)
    assert plaintext == plain
    assert len(content_key) == 32 and len(iv) == 12


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_master_keys_unwrap_to_expected(name: str) -> None:
    file_xml, _, expect = _example(name)
    _, dco_kek = _keks(name)
    got = _master_keys(file_xml, dco_kek)
    assert {d: (chf, key.hex().upper()) for d, (chf, key) in got.items()} == \
        {d: (v["chf"], v["hex"]) for d, v in expect["master_keys"].items()}


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_kcv_matches_expect_json(name: str) -> None:
    _, _, expect = _example(name)
    for key in ("s1sp_transport_key", "dco_transport_key"):
        assert kcv(bytes.fromhex(expect[key]["hex"])) == expect[key]["kcv_cmac"]
    values = [v for i in expect["installations"] for v in i["keys"].values()]
    values += list(expect["master_keys"].values())
    for v in values:
        assert kcv(bytes.fromhex(v["hex"]), "CMAC") == v["kcv_cmac"]
        assert kcv(bytes.fromhex(v["hex"]), "ECB") == v["kcv_ecb"]


# --------------------------------------------------------------------------- encoder = examples

@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_encoder_plaintext_is_byte_identical_to_example(name: str) -> None:
    _, plain, expect = _example(name)
    assert plaintext_xml(expect["group"], _installations_from_example(name)) == plain


@pytest.mark.parametrize("name", KW_EXAMPLES)
def test_encoder_reproduces_kw_example_byte_for_byte(name: str) -> None:
    """kw-aes256 and GCM are deterministic, so with the example's content key and IV the
    encoder must write the very same file."""
    file_xml, plain, expect = _example(name)
    s1sp_kek, dco_kek = _keks(name)
    _, content_key, iv = _decrypt(file_xml, s1sp_kek)
    installations = _installations_from_example(name)
    made = encrypt_file(
        file_id=expect["file_id"], group_id=expect["group"],
        originator_type=expect["originator_type"], originator_id=expect["originator_id"],
        plaintext=plain, s1sp_key_name=expect["s1sp_transport_key"]["name"], s1sp_kek=s1sp_kek,
        dco_key_name=expect["dco_transport_key"]["name"], dco_kek=dco_kek,
        master_keys=[i.master_key_entry() for i in installations],
        content_key=content_key, iv=iv)
    assert made == file_xml


# --------------------------------------------------------------------------- (b) round trip

@pytest.mark.parametrize("group,transport", [("EA", "kw"), ("EB", "oaep"), ("EC", "kw"),
                                             ("AA", "kw"), ("CB", "oaep")])
def test_encoder_file_round_trips(group: str, transport: str) -> None:
    installations = random_installations(5, group=group, seed=7)
    if transport == "kw":
        s1sp_kek, dco_kek = _keks("ea-kw")
        s1sp_send, dco_send = s1sp_kek, dco_kek
    else:
        s1sp_kek, dco_kek = _keks("eb-oaep")
        s1sp_send, dco_send = s1sp_kek.public_key(), dco_kek.public_key()
    made = build_file(installations, group_id=group, s1sp_key_name="S1SP-TK", s1sp_kek=s1sp_send,
                      dco_key_name="DCO-TK", dco_kek=dco_send)
    plaintext, _, _ = _decrypt(made, s1sp_kek)
    assert plaintext == plaintext_xml(group, installations)
    assert _master_keys(made, dco_kek) == {i.esme: (i.chf, i.master_key) for i in installations}
    _assert_valid(MIGRATION_FILE, made)
    _assert_valid(GROUP_INFORMATION, plaintext)


def test_fresh_content_key_and_iv_per_file() -> None:
    s1sp_kek, dco_kek = _keks("ea-kw")
    installations = random_installations(2, seed=1)
    a, b = (build_file(installations, s1sp_key_name="K", s1sp_kek=s1sp_kek, dco_key_name="D",
                       dco_kek=dco_kek) for _ in range(2))
    (_, ka, iva), (_, kb, ivb) = _decrypt(a, s1sp_kek), _decrypt(b, s1sp_kek)
    assert ka != kb and iva != ivb


def test_random_installations_follow_the_group_rules() -> None:
    ea = random_installations(30, group="EA", seed=3)
    assert all(i.prepay_key is not None for i in ea)
    assert any(i.gsme is None for i in ea) and any(i.gsme_prepay_key for i in ea)
    eb = random_installations(30, group="EB", seed=3)
    assert any(i.prepay_key is None for i in eb) and any(i.prepay_key for i in eb)
    aa = random_installations(4, group="AA", seed=3)
    assert all(i.certificate_der is None and set(i.secret_keys) ==
               {"AuthenticationKey", "EncryptionKey"} for i in aa)
    assert random_installations(3, seed=9) == random_installations(3, seed=9)
    for group in (ea, eb):
        ids = [x for i in group for x in (i.chf, i.esme, i.gsme) if x]
        assert len(ids) == len(set(ids))


# --------------------------------------------------------------------------- (c) xmlsec1 witness

XMLSEC1 = shutil.which("xmlsec1")


def _xmlsec1(args: list[str], file_xml: bytes, tmp_path: Path) -> str:
    path = tmp_path / "file.xml"
    path.write_bytes(file_xml)
    done = subprocess.run([XMLSEC1, "--decrypt", *args, str(path)], capture_output=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout.decode("utf-8")


@pytest.mark.skipif(XMLSEC1 is None, reason="xmlsec1 not installed")
def test_xmlsec1_decrypts_encoder_kw_file(tmp_path: Path) -> None:
    s1sp_kek, dco_kek = _keks("ea-kw")
    installations = random_installations(3, group="EA", seed=11)
    made = build_file(installations, s1sp_key_name="S1SP-TK-XMLSEC", s1sp_kek=s1sp_kek,
                      dco_key_name="DCO-TK-XMLSEC", dco_kek=dco_kek)
    kek = tmp_path / "kek.bin"
    kek.write_bytes(s1sp_kek)
    out = _xmlsec1(["--aeskey:S1SP-TK-XMLSEC", str(kek)], made, tmp_path)
    assert plaintext_xml("EA", installations).decode() in out


@pytest.mark.skipif(XMLSEC1 is None, reason="xmlsec1 not installed")
def test_xmlsec1_decrypts_encoder_oaep_file(tmp_path: Path) -> None:
    s1sp_kek, dco_kek = _keks("eb-oaep")
    installations = random_installations(3, group="EB", seed=12)
    made = build_file(installations, group_id="EB", originator_type="RequestingParty",
                      originator_id="RP-SUPPLIER-07", s1sp_key_name="S1SP-TK-EB-0202",
                      s1sp_kek=s1sp_kek.public_key(), dco_key_name="DCO-TK-EB-0202",
                      dco_kek=dco_kek.public_key())
    out = _xmlsec1(["--privkey-pem:S1SP-TK-EB-0202", str(EXAMPLES / "eb-oaep" / "s1sp_rsa.pem")],
                   made, tmp_path)
    assert plaintext_xml("EB", installations).decode() in out


@pytest.mark.skipif(XMLSEC1 is None, reason="xmlsec1 not installed")
@pytest.mark.parametrize("name", KW_EXAMPLES)
def test_xmlsec1_decrypts_kw_example_as_readme_says(name: str, tmp_path: Path) -> None:
    file_xml, plain, expect = _example(name)
    kek = tmp_path / "kek.bin"
    kek.write_bytes(bytes.fromhex(expect["s1sp_transport_key"]["hex"]))
    out = _xmlsec1([f"--aeskey:{expect['s1sp_transport_key']['name']}", str(kek)], file_xml,
                   tmp_path)
    assert plain.decode() in out


@pytest.mark.skipif(XMLSEC1 is None, reason="xmlsec1 not installed")
def test_xmlsec1_refuses_wrong_kek(tmp_path: Path) -> None:
    """The witness is only worth something if it can say no."""
    s1sp_kek, dco_kek = _keks("ea-kw")
    made = build_file(random_installations(1, seed=2), s1sp_key_name="K", s1sp_kek=s1sp_kek,
                      dco_key_name="D", dco_kek=dco_kek)
    kek = tmp_path / "kek.bin"
    kek.write_bytes(bytes(32))
    path = tmp_path / "file.xml"
    path.write_bytes(made)
    done = subprocess.run([XMLSEC1, "--decrypt", "--aeskey:K", str(kek), str(path)],
                          capture_output=True, timeout=60)
    assert done.returncode != 0


# --------------------------------------------------------------------------- (d) schemas

def test_schemas_compile_offline() -> None:
    for name in (MIGRATION_FILE, GROUP_INFORMATION, "xmlenc-subset.xsd", "xmldsig-subset.xsd"):
        assert isinstance(etree.XMLSchema(etree.parse(str(schema_path(name)), _PARSER)),
                          etree.XMLSchema)
    with pytest.raises(FileNotFoundError):
        schema_path("../domain.py")


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_examples_validate(name: str) -> None:
    file_xml, plain, _ = _example(name)
    _assert_valid(MIGRATION_FILE, file_xml)
    _assert_valid(GROUP_INFORMATION, plain)


@pytest.fixture(scope="module")
def ea_file() -> bytes:
    s1sp_kek, dco_kek = _keks("ea-kw")
    return build_file(random_installations(3, seed=5), s1sp_key_name="S1SP-TK",
                      s1sp_kek=s1sp_kek, dco_key_name="DCO-TK", dco_kek=dco_kek)


@pytest.mark.parametrize("mutation", [
    pytest.param(lambda x: remove(x, "/m:MigrationGroupEncryptedFile/m:MigrationHeader"),
                 id="no-header"),
    pytest.param(lambda x: duplicate(x, "//xenc:EncryptedData"), id="two-EncryptedData"),
    pytest.param(lambda x: set_text(x, "//m:MigrationHeader/m:GroupID", "ZZ"), id="group-ZZ"),
    pytest.param(lambda x: set_text(x, "//m:MigrationFileID", "bad id!"), id="file-id-chars"),
    pytest.param(lambda x: set_text(x, "//m:MigrationFileID", "A" * 65), id="file-id-long"),
    pytest.param(lambda x: set_text(x, "//m:OriginatorType", "Supplier"), id="originator-type"),
    pytest.param(lambda x: set_text(x, "//m:OriginatorID", ""), id="originator-empty"),
    pytest.param(lambda x: set_text(x, "//m:CreationDateTime", "yesterday"), id="date"),
    pytest.param(lambda x: remove(x, "//m:MasterKeyEntry", index=None), id="no-master-keys"),
    pytest.param(lambda x: remove(x, "//m:MasterKeyEntry/m:DeviceID"), id="entry-no-device"),
    pytest.param(lambda x: set_text(x, "//m:MasterKeyEntry/m:CHFIdentifier", "0" * 65),
                 id="eui64-too-long"),
    pytest.param(lambda x: set_text(x, "//xenc:CipherValue", "not base64!"), id="cipher-b64"),
    pytest.param(lambda x: remove(x, "//xenc:EncryptedData/ds:KeyInfo"), id="no-keyinfo"),
    pytest.param(lambda x: set_attribute(x, "//xenc:EncryptedData", "Bogus", "1"),
                 id="unknown-attribute"),
    pytest.param(lambda x: duplicate(x, "//m:MasterKeyEntry//ds:KeyName"),
                 id="two-keynames"),
])
def test_file_schema_rejects(ea_file: bytes, mutation) -> None:
    assert _valid(MIGRATION_FILE, ea_file)
    assert not _valid(MIGRATION_FILE, mutation(ea_file))


def test_file_schema_leaves_per_installation_and_algorithm_problems_to_the_service(
        ea_file: bytes) -> None:
    """A bad EUI-64 is INVALID_EUI64 for one installation and an unknown algorithm is
    UNSUPPORTED_ALGORITHM by name; a schema failure would hide both behind SCHEMA_INVALID."""
    assert _valid(MIGRATION_FILE, set_text(ea_file, "//m:MasterKeyEntry/m:DeviceID", "nonsense"))
    assert _valid(MIGRATION_FILE, set_text(ea_file, "//m:MasterKeyEntry/m:CHFIdentifier", ""))
    assert _valid(MIGRATION_FILE, set_attribute(
        ea_file, "//xenc:EncryptedKey/xenc:EncryptionMethod", "Algorithm",
        "http://www.w3.org/2001/04/xmlenc#kw-tripledes", index=None))
    assert _valid(MIGRATION_FILE, set_attribute(
        ea_file, "//xenc:EncryptedData/xenc:EncryptionMethod", "Algorithm",
        "http://www.w3.org/2001/04/xmlenc#aes256-cbc"))


def test_file_schema_requires_the_encrypted_data_type(ea_file: bytes) -> None:
    root = etree.fromstring(ea_file, _PARSER)
    del root.find(".//xenc:EncryptedData", NSMAP).attrib["Type"]
    assert not _schema(MIGRATION_FILE).validate(root.getroottree())


@pytest.fixture(scope="module")
def ea_plain() -> bytes:
    return plaintext_xml("EA", random_installations(3, seed=6))


@pytest.fixture(scope="module")
def aa_plain() -> bytes:
    return plaintext_xml("AA", random_installations(3, group="AA", seed=6))


@pytest.mark.parametrize("mutation", [
    pytest.param(lambda x: remove(x, "/*/m:Installation", index=None), id="no-installation"),
    pytest.param(lambda x: remove(x, "//m:DeviceCertificate"), id="no-certificate"),
    pytest.param(lambda x: remove(x, "//m:HighLevelAssociation"), id="no-hla"),
    pytest.param(lambda x: duplicate(x, "//m:AuthenticationKey"), id="two-auth-keys"),
    pytest.param(lambda x: duplicate(x, "//m:GSMEDetail"), id="two-gsme"),
    pytest.param(lambda x: duplicate(x, "//m:HighLevelAssociation/m:PrepaymentKey"),
                 id="two-prepay"),
    pytest.param(lambda x: set_text(x, "/*/m:GroupID", "ZZ"), id="group-ZZ"),
    pytest.param(lambda x: set_text(x, "//m:EncryptionKey", "A" * 65), id="key-too-long"),
    pytest.param(lambda x: set_text(x, "//m:DeviceCertificate", "A" * 16385), id="cert-too-long"),
])
def test_dp_plaintext_schema_rejects(ea_plain: bytes, mutation) -> None:
    assert _valid(GROUP_INFORMATION, ea_plain)
    assert not _valid(GROUP_INFORMATION, mutation(ea_plain))


def test_dp_plaintext_element_order_is_enforced(ea_plain: bytes) -> None:
    root = etree.fromstring(ea_plain, _PARSER)
    hla = root.find(".//m:HighLevelAssociation", NSMAP)
    hla.insert(0, hla[1])  # EncryptionKey before AuthenticationKey
    assert not _schema(GROUP_INFORMATION).validate(root.getroottree())


def test_dp_plaintext_leaves_key_and_eui64_problems_to_the_service(ea_plain: bytes) -> None:
    assert _valid(GROUP_INFORMATION, remove(ea_plain, "//m:HighLevelAssociation/m:PrepaymentKey"))
    assert _valid(GROUP_INFORMATION, set_text(ea_plain, "//m:EncryptionKey", "00" * 16))
    assert _valid(GROUP_INFORMATION, set_text(ea_plain, "//m:AuthenticationKey", "xyz"))
    assert _valid(GROUP_INFORMATION, set_text(ea_plain, "//m:ESMEDetail/m:DeviceID", "10-ZZ"))
    assert _valid(GROUP_INFORMATION, set_text(ea_plain, "//m:DeviceCertificate", "garbage"))
    # GROUP_ID_MISMATCH is the service's to report, so any GroupID passes under either root
    assert _valid(GROUP_INFORMATION, set_text(ea_plain, "/*/m:GroupID", "AA"))


@pytest.mark.parametrize("mutation", [
    pytest.param(lambda x: remove(x, "//m:ESMEDetail/m:SecretKey", index=None), id="no-secret"),
    pytest.param(lambda x: _drop_name(x), id="no-name"),
    pytest.param(lambda x: set_text(x, "//m:SecretKey", "F" * 65), id="key-too-long"),
    pytest.param(lambda x: remove(x, "//m:ESMEDetail"), id="no-esme"),
])
def test_non_dp_plaintext_schema_rejects(aa_plain: bytes, mutation) -> None:
    assert _valid(GROUP_INFORMATION, aa_plain)
    assert not _valid(GROUP_INFORMATION, mutation(aa_plain))


def _drop_name(xml: bytes) -> bytes:
    root = etree.fromstring(xml, _PARSER)
    del root.find(".//m:SecretKey", NSMAP).attrib["Name"]
    return etree.tostring(root)


def test_the_other_root_is_schema_valid_so_the_service_can_name_the_mismatch() -> None:
    """PLAINTEXT_ROOT_MISMATCH is a code of its own; the schema accepts both roots."""
    dp_for_aa = plaintext_xml("AA", random_installations(1, seed=4),
                              root="DecryptedS1SPDPGroupInformation")
    assert etree.fromstring(dp_for_aa).tag.endswith("DecryptedS1SPDPGroupInformation")
    _assert_valid(GROUP_INFORMATION, dp_for_aa)


# --------------------------------------------------------------------------- (e) scale

def test_thousand_installation_ea_file_is_quick_to_make() -> None:
    s1sp_kek, dco_kek = _keks("ea-kw")
    started = time.perf_counter()
    installations = random_installations(1000, group="EA", seed=2020)
    made = build_file(installations, s1sp_key_name="S1SP-TK", s1sp_kek=s1sp_kek,
                      dco_key_name="DCO-TK", dco_kek=dco_kek)
    elapsed = time.perf_counter() - started
    print(f"1000-installation EA file: {len(made)} bytes in {elapsed * 1000:.0f} ms")
    _assert_valid(MIGRATION_FILE, made)
    plaintext, _, _ = _decrypt(made, s1sp_kek)
    _assert_valid(GROUP_INFORMATION, plaintext)
    assert plaintext.count(b"<Installation>") == 1000
    assert plaintext.count(base64.b64encode(DUMMY_CERTIFICATE_DER)) == 1000


def test_certificate_factory_makes_certificates_like_the_examples() -> None:
    factory = DeviceCertificateFactory()
    installations = random_installations(3, group="EB", seed=8, cert_factory=factory)
    example_der = _installations_from_example("ea-kw")[0].certificate_der
    assert example_der is not None
    example = x509.load_der_x509_certificate(example_der)
    ca = x509.load_pem_x509_certificate(factory.ca_pem)
    for inst in installations:
        cert = x509.load_der_x509_certificate(inst.certificate_der)
        cert.verify_directly_issued_by(ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        (other,) = san.value
        assert san.critical and other.value.endswith(bytes.fromhex(inst.chf.replace("-", "")))
        ex_other = example.extensions.get_extension_for_class(x509.SubjectAlternativeName).value[0]
        assert other.type_id == ex_other.type_id and other.value[:-8] == ex_other.value[:-8]
        assert cert.subject == example.subject
        assert cert.not_valid_after_utc == example.not_valid_after_utc
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    _assert_valid(GROUP_INFORMATION, plaintext_xml("EB", installations))


def test_mutation_helpers_keep_the_declaration_and_edit_only_the_target(ea_file: bytes) -> None:
    edited = set_text(ea_file, "//m:OriginatorID", "SMSO-OTHER")
    assert edited.startswith(b"<?xml version='1.0' encoding='UTF-8'?>")
    assert edited.replace(b"SMSO-OTHER", b"SMSO-LG-01") == ea_file
    with pytest.raises(LookupError):
        set_text(ea_file, "//m:NoSuchThing", "x")
