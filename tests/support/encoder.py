"""Independent encoder for Migration Group Encrypted Files, for tests and benchmarks.

It follows shared/spec/migration-crypto-profile.md using pyca/cryptography only, and imports
nothing from keysvc except `keysvc.domain`, so a file it makes is a second opinion on the
profile rather than an echo of the service's own reading of it. Given the same content key
and IV it reproduces the kw-aes256 examples in shared/spec/examples byte for byte.

Nothing here guards secrets: every key it makes is a throwaway test key.
"""
from __future__ import annotations

import base64
import copy
import datetime as _dt
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Union
from xml.sax.saxutils import escape as _escape

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.cmac import CMAC
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from cryptography.x509.oid import ObjectIdentifier
from lxml import etree

from keysvc.domain import eui64_bytes

NS = "urn:keysvc:smets1:migration:1.2"
XENC_NS = "http://www.w3.org/2001/04/xmlenc#"
DS_NS = "http://www.w3.org/2000/09/xmldsig#"
#: Prefixes for the XPath helpers below; `m` is the migration (default) namespace.
NSMAP = {"m": NS, "xenc": XENC_NS, "ds": DS_NS}

ALG_AES256_GCM = "http://www.w3.org/2009/xmlenc11#aes256-gcm"
ALG_KW_AES256 = "http://www.w3.org/2001/04/xmlenc#kw-aes256"
ALG_RSA_OAEP_MGF1P = "http://www.w3.org/2001/04/xmlenc#rsa-oaep-mgf1p"
TYPE_ELEMENT = "http://www.w3.org/2001/04/xmlenc#Element"

GROUP_IDS = ("AA", "BA", "CA", "CB", "EA", "EB", "EC")
DUAL_PROTOCOL_GROUPS = frozenset({"EA", "EB", "EC"})
ROOT_DP = "DecryptedS1SPDPGroupInformation"
ROOT_NON_DP = "DecryptedS1SPGroupInformation"

#: Stand-in DeviceCertificate when no factory is given: DER-shaped but deliberately not a
#: certificate, so a service reports it (CERT_PARSE) rather than trusting it by accident.
DUMMY_CERTIFICATE_DER = bytes.fromhex("300a0408") + b"NOT-CERT"

#: RFC 4108 hardwareModuleName and the GBCS hwType that the examples' certificates carry.
_OID_HARDWARE_MODULE_NAME = ObjectIdentifier("1.3.6.1.5.5.7.8.4")
_GBCS_HW_TYPE_DER = bytes.fromhex("060d2a863a0001848fb90f01020201")  # 1.2.826.0.1.8641679.1.2.2.1

Kek = Union[bytes, rsa.RSAPublicKey, rsa.RSAPrivateKey]
MasterKey = tuple[str, str, bytes]  # (CHFIdentifier, ESME DeviceID, key bytes)


@dataclass
class TestInstallation:
    """One SMETS1 installation and every key that a file for it carries.

    Keys are bytes, never hex, so that a test can corrupt them (all-zero, wrong length)
    before they are written. For AA-type groups `secret_keys` gives the ESME's SecretKey
    elements; left empty, AuthenticationKey and EncryptionKey are used, as in the aa-kw
    example.
    """

    __test__ = False  # pytest: a data holder, not a test class

    chf: str
    esme: str
    auth_key: bytes
    enc_key: bytes
    master_key: bytes
    prepay_key: bytes | None = None
    gsme: str | None = None
    gsme_prepay_key: bytes | None = None
    certificate_der: bytes | None = None
    secret_keys: dict[str, bytes] = field(default_factory=dict)
    gsme_secret_keys: dict[str, bytes] = field(default_factory=dict)

    def esme_secret_keys(self) -> dict[str, bytes]:
        return dict(self.secret_keys) or {"AuthenticationKey": self.auth_key,
                                          "EncryptionKey": self.enc_key}

    def master_key_entry(self) -> MasterKey:
        return (self.chf, self.esme, self.master_key)


# --------------------------------------------------------------------------- certificates

class DeviceCertificateFactory:
    """Issues DeviceCertificates shaped like the examples' (TMAD Table 10.1 as profiled).

    Empty subject, critical subjectAltName with the CHF identifier as hwSerialNum, critical
    keyUsage digitalSignature, ECDSA P-256, valid 2019-06-01 to 99991231235959Z, issued by a
    fresh P-256 CA. Hand `ca_pem` to the service as a trust anchor to get ACCEPTED
    installations; use it as `cert_factory` for `random_installations`.
    """

    def __init__(self, ca_name: str = "Test SMSO Device CA", *,
                 not_before: _dt.datetime = _dt.datetime(2019, 6, 1, tzinfo=_dt.timezone.utc),
                 not_after: _dt.datetime = _dt.datetime(9999, 12, 31, 23, 59, 59,
                                                        tzinfo=_dt.timezone.utc)) -> None:
        self.not_before = not_before
        self.not_after = not_after
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, ca_name)])
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )

    @property
    def ca_pem(self) -> bytes:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM)

    def __call__(self, chf: str) -> bytes:
        serial = eui64_bytes(chf)
        hw_module_name = (b"\x30" + bytes([len(_GBCS_HW_TYPE_DER) + 2 + len(serial)])
                          + _GBCS_HW_TYPE_DER + b"\x04" + bytes([len(serial)]) + serial)
        device_key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([])).issuer_name(self.ca_cert.subject)
            .public_key(device_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.not_before).not_valid_after(self.not_after)
            .add_extension(x509.SubjectAlternativeName(
                [x509.OtherName(_OID_HARDWARE_MODULE_NAME, hw_module_name)]), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.DER)


def _key_usage(*, digital_signature: bool = False, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False,
                         decipher_only=False)


# --------------------------------------------------------------------------- installations

def random_installations(n: int, *, group: str = "EA", seed: int | None = None,
                         cert_factory: Callable[[str], bytes] | None = None,
                         ) -> list[TestInstallation]:
    """`n` installations with unique identifiers and valid keys, for `group`'s plaintext.

    With a seed the identifiers and keys are reproducible (certificates from a factory are
    not). The optional parts vary with the index so that one file exercises them all: EA has
    a PrepaymentKey on every ESME (the profile requires it) and a GSME on two installations
    in three; EB and EC leave the ESME PrepaymentKey out on odd indexes; AA-type groups get
    AuthenticationKey/EncryptionKey SecretKeys and a GSME without keys.
    """
    rng = random.Random(seed) if seed is not None else None
    randbytes: Callable[[int], bytes] = rng.randbytes if rng is not None else os.urandom
    used: set[bytes] = set()

    def eui64(prefix: int) -> str:
        while True:
            raw = bytes([prefix]) + randbytes(7)
            if raw not in used:
                used.add(raw)
                return "-".join(f"{b:02X}" for b in raw)

    def key() -> bytes:
        while True:
            k = randbytes(16)
            if len(set(k)) > 1:  # all bytes equal is an invalid key by the profile
                return k

    dual = group in DUAL_PROTOCOL_GROUPS
    out: list[TestInstallation] = []
    for i in range(n):
        chf, esme = eui64(0x00), eui64(0x10)
        gsme = eui64(0x20) if i % 3 != 2 else None
        inst = TestInstallation(chf=chf, esme=esme, auth_key=key(), enc_key=key(),
                                master_key=key(), gsme=gsme)
        if dual:
            if group == "EA" or i % 2 == 0:
                inst.prepay_key = key()
            if gsme is not None:
                inst.gsme_prepay_key = key()
            inst.certificate_der = (cert_factory(chf) if cert_factory is not None
                                    else DUMMY_CERTIFICATE_DER)
        else:
            inst.secret_keys = {"AuthenticationKey": inst.auth_key,
                                "EncryptionKey": inst.enc_key}
        out.append(inst)
    return out


# --------------------------------------------------------------------------- plaintext

def plaintext_xml(group_id: str, installations: Iterable[TestInstallation], *,
                  root: str | None = None) -> bytes:
    """The group information as the SMSO would encrypt it: one element, no XML declaration.

    Built as text rather than through lxml because benchmarks make files of many thousands
    of installations and because the examples' exact bytes (no whitespace between elements)
    are then easy to match. `root` overrides the root element that `group_id` implies, to
    make PLAINTEXT_ROOT_MISMATCH cases.
    """
    if root is None:
        root = ROOT_DP if group_id in DUAL_PROTOCOL_GROUPS else ROOT_NON_DP
    dual = root == ROOT_DP
    parts = [f'<{root} xmlns="{NS}"><GroupID>{_escape(group_id)}</GroupID>']
    for inst in installations:
        parts.append(f"<Installation><CHFIdentifier>{_escape(inst.chf)}</CHFIdentifier>")
        if dual:
            cert = inst.certificate_der if inst.certificate_der is not None \
                else DUMMY_CERTIFICATE_DER
            parts.append(f"<DeviceCertificate>{_b64(cert)}</DeviceCertificate>")
            parts.append(f"<ESMEDetail><DeviceID>{_escape(inst.esme)}</DeviceID>"
                         f"<HighLevelAssociation>"
                         f"<AuthenticationKey>{_hex(inst.auth_key)}</AuthenticationKey>"
                         f"<EncryptionKey>{_hex(inst.enc_key)}</EncryptionKey>")
            if inst.prepay_key is not None:
                parts.append(f"<PrepaymentKey>{_hex(inst.prepay_key)}</PrepaymentKey>")
            parts.append("</HighLevelAssociation></ESMEDetail>")
            if inst.gsme is not None:
                parts.append(f"<GSMEDetail><DeviceID>{_escape(inst.gsme)}</DeviceID>")
                if inst.gsme_prepay_key is not None:
                    parts.append(f"<PrePayDetails><PrepaymentKey>{_hex(inst.gsme_prepay_key)}"
                                 f"</PrepaymentKey></PrePayDetails>")
                parts.append("</GSMEDetail>")
        else:
            parts.append(f"<ESMEDetail><DeviceID>{_escape(inst.esme)}</DeviceID>")
            parts.extend(_secret_keys(inst.esme_secret_keys()))
            parts.append("</ESMEDetail>")
            if inst.gsme is not None:
                parts.append(f"<GSMEDetail><DeviceID>{_escape(inst.gsme)}</DeviceID>")
                parts.extend(_secret_keys(inst.gsme_secret_keys))
                parts.append("</GSMEDetail>")
        parts.append("</Installation>")
    parts.append(f"</{root}>")
    return "".join(parts).encode("utf-8")


def _secret_keys(keys: dict[str, bytes]) -> list[str]:
    return [f'<SecretKey Name="{_attr(name)}">{_hex(k)}</SecretKey>' for name, k in keys.items()]


# --------------------------------------------------------------------------- encryption

def wrap_key(key: bytes, kek: Kek) -> tuple[str, bytes]:
    """Key transport as the profile allows it: (algorithm URI, wrapped bytes).

    A bytes KEK means a shared 256-bit transport key (RFC 3394); an RSA key means the
    recipient's key (OAEP, SHA-1, MGF1-SHA-1, no label), as xmlenc's rsa-oaep-mgf1p fixes.
    """
    if isinstance(kek, rsa.RSAPrivateKey):
        kek = kek.public_key()
    if isinstance(kek, rsa.RSAPublicKey):
        return ALG_RSA_OAEP_MGF1P, kek.encrypt(key, _OAEP_SHA1)
    if len(kek) != 32:
        raise ValueError("kw-aes256 needs a 256-bit transport key")
    return ALG_KW_AES256, aes_key_wrap(bytes(kek), key)


_OAEP_SHA1 = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(),
                          label=None)


def encrypt_file(*, file_id: str, group_id: str, originator_type: str, originator_id: str,
                 plaintext: bytes, s1sp_key_name: str, s1sp_kek: Kek, dco_key_name: str,
                 dco_kek: Kek, master_keys: Sequence[MasterKey],
                 creation: str = "2020-03-02T09:30:00Z", content_key: bytes | None = None,
                 iv: bytes | None = None) -> bytes:
    """A complete Migration Group Encrypted File around an arbitrary plaintext.

    The plaintext is taken as given (not checked) so that tests can encrypt broken group
    information and see the service reject it after decryption. `content_key` and `iv`
    exist to reproduce a known file; left out they are fresh, as the profile requires.
    The layout is the examples' own (two-space indent, lxml-style declaration).
    """
    content_key = os.urandom(32) if content_key is None else content_key
    iv = os.urandom(12) if iv is None else iv
    sealed = AESGCM(content_key).encrypt(iv, plaintext, None)  # ciphertext || tag(16)
    content_alg, wrapped_content_key = wrap_key(content_key, s1sp_kek)

    out = [
        "<?xml version='1.0' encoding='UTF-8'?>\n",
        f'<MigrationGroupEncryptedFile xmlns="{NS}" xmlns:xenc="{XENC_NS}" xmlns:ds="{DS_NS}">\n',
        "  <MigrationHeader>\n",
        f"    <MigrationFileID>{_escape(file_id)}</MigrationFileID>\n",
        f"    <GroupID>{_escape(group_id)}</GroupID>\n",
        f"    <OriginatorType>{_escape(originator_type)}</OriginatorType>\n",
        f"    <OriginatorID>{_escape(originator_id)}</OriginatorID>\n",
        f"    <CreationDateTime>{_escape(creation)}</CreationDateTime>\n",
        "  </MigrationHeader>\n",
        "  <EncryptedS1SPGroupInformation>\n",
        f'    <xenc:EncryptedData Type="{TYPE_ELEMENT}">\n',
        f'      <xenc:EncryptionMethod Algorithm="{ALG_AES256_GCM}"/>\n',
        "      <ds:KeyInfo>\n",
        *_encrypted_key("        ", content_alg, s1sp_key_name, wrapped_content_key),
        "      </ds:KeyInfo>\n",
        "      <xenc:CipherData>\n",
        f"        <xenc:CipherValue>{_b64(iv + sealed)}</xenc:CipherValue>\n",
        "      </xenc:CipherData>\n",
        "    </xenc:EncryptedData>\n",
        "  </EncryptedS1SPGroupInformation>\n",
        "  <EncryptedMasterKey>\n",
    ]
    for chf, device_id, master_key in master_keys:
        alg, wrapped = wrap_key(master_key, dco_kek)
        out += [
            "    <MasterKeyEntry>\n",
            f"      <CHFIdentifier>{_escape(chf)}</CHFIdentifier>\n",
            f"      <DeviceID>{_escape(device_id)}</DeviceID>\n",
            *_encrypted_key("      ", alg, dco_key_name, wrapped),
            "    </MasterKeyEntry>\n",
        ]
    out += ["  </EncryptedMasterKey>\n", "</MigrationGroupEncryptedFile>\n"]
    return "".join(out).encode("utf-8")


def _encrypted_key(indent: str, algorithm: str, key_name: str, wrapped: bytes) -> list[str]:
    return [
        f"{indent}<xenc:EncryptedKey>\n",
        f'{indent}  <xenc:EncryptionMethod Algorithm="{_attr(algorithm)}"/>\n',
        f"{indent}  <ds:KeyInfo>\n",
        f"{indent}    <ds:KeyName>{_escape(key_name)}</ds:KeyName>\n",
        f"{indent}  </ds:KeyInfo>\n",
        f"{indent}  <xenc:CipherData>\n",
        f"{indent}    <xenc:CipherValue>{_b64(wrapped)}</xenc:CipherValue>\n",
        f"{indent}  </xenc:CipherData>\n",
        f"{indent}</xenc:EncryptedKey>\n",
    ]


def build_file(installations: Sequence[TestInstallation], *, group_id: str = "EA",
               file_id: str = "MGEF-TEST-00000001", originator_type: str = "SMSO",
               originator_id: str = "SMSO-LG-01", s1sp_key_name: str, s1sp_kek: Kek,
               dco_key_name: str, dco_kek: Kek, creation: str = "2020-03-02T09:30:00Z",
               ) -> bytes:
    """The usual case in one call: plaintext and master key entries from the installations."""
    return encrypt_file(
        file_id=file_id, group_id=group_id, originator_type=originator_type,
        originator_id=originator_id, plaintext=plaintext_xml(group_id, installations),
        s1sp_key_name=s1sp_key_name, s1sp_kek=s1sp_kek, dco_key_name=dco_key_name,
        dco_kek=dco_kek, master_keys=[i.master_key_entry() for i in installations],
        creation=creation)


# --------------------------------------------------------------------------- key check values

def kcv(key: bytes, method: str = "CMAC") -> str:
    """Key check value as the profile defines it, to compare with what the service reports."""
    if method == "CMAC":
        mac = CMAC(algorithms.AES(key))
        mac.update(bytes(16))
        return mac.finalize()[:5].hex().upper()
    if method == "ECB":
        enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
        return (enc.update(bytes(16)) + enc.finalize())[:3].hex().upper()
    raise ValueError(f"unknown KCV method {method!r}")


# --------------------------------------------------------------------------- mutations

def set_text(xml: bytes, path: str, text: str, *, index: int | None = 0) -> bytes:
    """Replace the text of the `index`th match of `path` (all matches when index is None).

    `path` is XPath with the prefixes of NSMAP, e.g. "//m:GroupID" or "//xenc:CipherValue".
    """
    def edit(el: etree._Element) -> None:
        el.text = text
    return _mutate(xml, path, index, edit)


def set_attribute(xml: bytes, path: str, name: str, value: str, *,
                  index: int | None = 0) -> bytes:
    def edit(el: etree._Element) -> None:
        el.set(name, value)
    return _mutate(xml, path, index, edit)


def remove(xml: bytes, path: str, *, index: int | None = 0) -> bytes:
    def edit(el: etree._Element) -> None:
        parent = el.getparent()
        if parent is None:
            raise ValueError("cannot remove the root element")
        parent.remove(el)
    return _mutate(xml, path, index, edit)


def duplicate(xml: bytes, path: str, *, index: int | None = 0) -> bytes:
    """Insert a copy of the match right after it: two EncryptedData, a repeated entry."""
    def edit(el: etree._Element) -> None:
        el.addnext(copy.deepcopy(el))
    return _mutate(xml, path, index, edit)


def _mutate(xml: bytes, path: str, index: int | None,
            edit: Callable[[etree._Element], None]) -> bytes:
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             huge_tree=True)
    root = etree.fromstring(xml, parser)
    matches = root.xpath(path, namespaces=NSMAP)
    if not matches:
        raise LookupError(f"no element matches {path!r}")
    for el in (matches if index is None else [matches[index]]):
        edit(el)
    declaration = xml.lstrip().startswith(b"<?xml")
    out = etree.tostring(root.getroottree(), xml_declaration=declaration, encoding="UTF-8")
    return out + b"\n" if declaration else out


# --------------------------------------------------------------------------- small helpers

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _hex(data: bytes) -> str:
    return data.hex().upper()


def _attr(value: str) -> str:
    return _escape(value, {'"': "&quot;"})
