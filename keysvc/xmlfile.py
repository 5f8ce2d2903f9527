"""Reading Migration Group Encrypted Files: hardened parsing, schema validation, the model.

The parser refuses DTDs, entities and network access, bounds size and depth, and insists on
UTF-8, before any element reaches the schema (lxml's XMLSchema, in C: files carry thousands
of installations). Errors name the rule that failed and the element, never a value: the
plaintext holds key bits and schema messages would otherwise echo them.
"""
from __future__ import annotations

import binascii
import codecs
import io
import re
from dataclasses import dataclass
from functools import lru_cache

from lxml import etree

from keysvc import tracing
from keysvc.errors import error
from keysvc.schemas import GROUP_INFORMATION, MIGRATION_FILE, schema_path

NS = "urn:keysvc:smets1:migration:1.2"
XENC = "http://www.w3.org/2001/04/xmlenc#"
DS = "http://www.w3.org/2000/09/xmldsig#"
NSMAP = {"m": NS, "xenc": XENC, "ds": DS}

KW_AES256 = "http://www.w3.org/2001/04/xmlenc#kw-aes256"
RSA_OAEP_MGF1P = "http://www.w3.org/2001/04/xmlenc#rsa-oaep-mgf1p"
AES256_GCM = "http://www.w3.org/2009/xmlenc11#aes256-gcm"
KEY_TRANSPORTS = (KW_AES256, RSA_OAEP_MGF1P)

DP_GROUPS = ("EA", "EB", "EC")
ROOT_FOR_GROUP = {**{g: "DecryptedS1SPDPGroupInformation" for g in DP_GROUPS},
                  **{g: "DecryptedS1SPGroupInformation" for g in ("AA", "BA", "CA", "CB")}}

_FORBIDDEN = re.compile(rb"<!(DOCTYPE|ENTITY|ELEMENT|ATTLIST|NOTATION)")
_DECL_ENCODING = re.compile(rb"^\s*<\?xml[^>]*encoding\s*=\s*[\"']([A-Za-z0-9._-]+)[\"']")


@dataclass(frozen=True)
class MigrationHeader:
    migration_file_id: str
    group_id: str
    originator_type: str
    originator_id: str
    creation_date_time: str


@dataclass(frozen=True)
class EncryptedKey:
    algorithm: str
    key_name: str
    cipher_value: bytes


@dataclass(frozen=True)
class EncryptedData:
    algorithm: str
    encrypted_key: EncryptedKey
    cipher_value: bytes


@dataclass(frozen=True)
class MasterKeyEntry:
    chf_identifier: str   # as written; the caller normalises and reports INVALID_EUI64
    device_id: str
    encrypted_key: EncryptedKey


@dataclass(frozen=True)
class MigrationFile:
    header: MigrationHeader
    master_key_entries: tuple[MasterKeyEntry, ...]
    group_information: EncryptedData | None   # None in the DCO view


# --------------------------------------------------------------------------- parsing
# huge_tree lifts libxml2's 10,000,000-character text-node limit: the S1SP group information
# is one base64 text node, 48 MB in a 64 MiB file. The limits that matter stay: the size cap
# (checked first), no DTD or entity (refused before parsing, and never resolved), no network.
# Indentation between elements is dropped (remove_blank_text): it halves the tree of a
# large file (70 MB instead of 126 at 35,000 installations), and no schema here gives it a
# meaning; an element whose only content is blank keeps it.
_PARSER_OPTIONS = dict(resolve_entities=False, no_network=True, load_dtd=False,
                       dtd_validation=False, huge_tree=True, remove_comments=True,
                       remove_pis=True, remove_blank_text=True, collect_ids=False)


def _parser() -> etree.XMLParser:
    return etree.XMLParser(**_PARSER_OPTIONS)


# The fewest bytes per tag ('<') a document may have. A parsed element costs lxml about 130
# bytes, so a flood of empty elements (`<x/>`, 4 bytes) would make a 64 MiB file into 2 GB
# of tree. Valid documents are far sparser: an outer file's tags are 45 bytes apart or more
# (its base64 holds none), a compact group information's 24; the limits leave half of that.
BYTES_PER_TAG_OUTER = 24
BYTES_PER_TAG_PLAINTEXT = 12


def _check_bytes(data: bytes, max_bytes: int, what: str, bytes_per_tag: int) -> None:
    """What is refused before libxml2 sees a byte: size, DTDs and entities, a flood of
    elements, not UTF-8."""
    if len(data) > max_bytes:
        raise error("FILE_TOO_LARGE", f"{what} is {len(data)} bytes; the limit is {max_bytes}")
    tags = data.count(b"<")
    if tags > len(data) // bytes_per_tag + 1024:
        raise error("FORBIDDEN_XML_CONSTRUCT", f"{what} has {tags} tags in {len(data)} bytes: "
                                               f"more than one in {bytes_per_tag}")
    if _FORBIDDEN.search(data):
        raise error("FORBIDDEN_XML_CONSTRUCT", f"{what} carries a DTD or entity declaration")
    m = _DECL_ENCODING.match(data)
    if m and m.group(1).decode().upper().replace("_", "-") not in ("UTF-8", "UTF8"):
        raise error("MALFORMED_XML", f"{what} must be UTF-8, not {m.group(1).decode()!r}")
    try:
        if not data.isascii():  # (ASCII is UTF-8, and checking it copies nothing)
            codecs.utf_8_decode(data, "strict", True)
    except UnicodeDecodeError as exc:
        raise error("MALFORMED_XML", f"{what} is not valid UTF-8 (byte {exc.start})") from None


def _syntax_error(exc: etree.XMLSyntaxError, what: str) -> Exception:
    line = getattr(exc, "lineno", 0)
    return error("MALFORMED_XML", f"{what} is not well-formed XML (line {line})")


def _no_doctype(root: etree._Element, what: str) -> None:
    if root.getroottree().docinfo.doctype:
        raise error("FORBIDDEN_XML_CONSTRUCT", f"{what} carries a DOCTYPE")


def parse_hardened(data: bytes, *, max_bytes: int, max_depth: int, what: str = "file",
                   bytes_per_tag: int = BYTES_PER_TAG_PLAINTEXT) -> etree._Element:
    """Parse untrusted XML bytes, or raise the api.md code for why not."""
    _check_bytes(data, max_bytes, what, bytes_per_tag)
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as exc:
        raise _syntax_error(exc, what) from None
    _no_doctype(root, what)
    return root


def _check_depth(root: etree._Element, max_depth: int, what: str) -> None:
    """Refuse a tree with an element deeper than `max_depth` (the root is at depth 1).

    One XPath in C (an element at depth max_depth + 1 exists?): a walk in Python held a
    tuple per element, a gigabyte for a 15 MiB flood of empty elements."""
    if root.xpath("boolean(/*" + "/*" * max_depth + ")"):
        raise error("FORBIDDEN_XML_CONSTRUCT", f"{what} nests deeper than {max_depth}")


@lru_cache(maxsize=None)
def _schema(name: str) -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(str(schema_path(name))))


def validate(root: etree._Element, schema_name: str, what: str, max_depth: int) -> None:
    """Schema validation; a document that fails is also checked against the depth limit.

    libxml2 itself refuses nesting past 2048 levels (huge_tree). Our lower limit is
    only checked on documents that fail their schema: a schema-valid document is never
    deeper than its schema allows, and walking every element of a large valid file in
    Python would cost more than the validation itself.
    """
    schema = _schema(schema_name)
    with tracing.span("xml.schema", schema=schema_name):
        valid = schema.validate(root)
    if not valid:
        _check_depth(root, max_depth, what)
        err = schema.error_log.last_error
        where = f"line {err.line}" if err is not None else "?"
        elem = _element_in_error(err.message if err is not None else "")
        raise error("SCHEMA_INVALID", f"{what} does not match its schema at {where}"
                                      + (f" (element {elem[:64]})" if elem else ""))


_ELEMENT_IN_MESSAGE = re.compile(r"Element '(?:\{[^}]*\})?([A-Za-z0-9_:]+)'")


def _element_in_error(message: str) -> str:
    """Only the element's name from an lxml message: the rest may quote a key's value."""
    m = _ELEMENT_IN_MESSAGE.search(message)
    return m.group(1) if m else ""


def strict_base64(text: str | None, what: str) -> bytes:
    """Canonical base64 only: truncated or padded-oddly input is refused, not guessed at.

    Written for 48 MB of group information as much as for one key: XML whitespace goes in
    one C pass, the strict decoder refuses anything outside the alphabet or after the
    padding, and canonical form (unused bits zero) is checked on the last quantum alone.
    """
    try:
        compact = (text or "").encode("ascii").translate(None, b" \t\r\n")
        raw = binascii.a2b_base64(compact, strict_mode=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise error("SCHEMA_INVALID", f"{what} is not valid base64") from None
    tail = len(raw) % 3 or 3
    if (not raw or len(compact) != 4 * ((len(raw) + 2) // 3)
            or binascii.b2a_base64(raw[-tail:], newline=False) != compact[-4:]):
        raise error("SCHEMA_INVALID", f"{what} is not canonical base64")
    return raw


# --------------------------------------------------------------------------- the model
def _text(el: etree._Element, path: str) -> str:
    found = el.find(path, NSMAP)
    return (found.text or "").strip() if found is not None else ""


def _encrypted_key(el: etree._Element, what: str) -> EncryptedKey:
    method = el.find("xenc:EncryptionMethod", NSMAP)
    return EncryptedKey(
        algorithm=(method.get("Algorithm") or "") if method is not None else "",
        key_name=_text(el, "ds:KeyInfo/ds:KeyName"),
        cipher_value=strict_base64(_text(el, "xenc:CipherData/xenc:CipherValue"), what))


def _header(root: etree._Element) -> MigrationHeader:
    h = root.find("m:MigrationHeader", NSMAP)
    return MigrationHeader(_text(h, "m:MigrationFileID"), _text(h, "m:GroupID"),
                           _text(h, "m:OriginatorType"), _text(h, "m:OriginatorID"),
                           _text(h, "m:CreationDateTime"))


_KEY_NAME = f"{{{DS}}}KeyName"


def _master_key_entries(root: etree._Element) -> tuple[MasterKeyEntry, ...]:
    """Read by position, not by path: the schema has already fixed every child's place
    (CHFIdentifier, DeviceID, EncryptedKey{EncryptionMethod, KeyInfo, CipherData}), and a
    file carries thousands of entries."""
    entries = []
    container = root.find("m:EncryptedMasterKey", NSMAP)
    for i, e in enumerate(container, 1):
        chf, device, ek = e[0], e[1], e[2]
        method, key_info, cipher_data = ek[0], ek[1], ek[2]
        name_el = key_info[0]
        entries.append(MasterKeyEntry(
            (chf.text or "").strip(), (device.text or "").strip(),
            EncryptedKey(method.get("Algorithm") or "",
                         (name_el.text or "").strip() if name_el.tag == _KEY_NAME else "",
                         strict_base64(cipher_data[0].text,
                                       f"MasterKeyEntry {i} CipherValue"))))
    return tuple(entries)


_PLACEHOLDER = (
    f'<EncryptedS1SPGroupInformation xmlns="{NS}" xmlns:xenc="{XENC}" xmlns:ds="{DS}">'
    f'<xenc:EncryptedData Type="{XENC}Element"><xenc:EncryptionMethod Algorithm="{AES256_GCM}"/>'
    f'<ds:KeyInfo><ds:KeyName>-</ds:KeyName></ds:KeyInfo><xenc:CipherData>'
    f'<xenc:CipherValue>AA==</xenc:CipherValue></xenc:CipherData></xenc:EncryptedData>'
    f'</EncryptedS1SPGroupInformation>')


_GROUP_INFORMATION = f"{{{NS}}}EncryptedS1SPGroupInformation"
_ENCRYPTED_DATA = f"{{{XENC}}}EncryptedData"
_CIPHER_DATA = f"{{{XENC}}}CipherData"
_CIPHER_VALUE = f"{{{XENC}}}CipherValue"


def _is_group_ciphertext(el: etree._Element) -> bool:
    """EncryptedS1SPGroupInformation/EncryptedData/CipherData/CipherValue (not the
    EncryptedKey's own CipherValue, which sits deeper)."""
    data = el.getparent()
    encrypted = data.getparent() if data is not None else None
    info = encrypted.getparent() if encrypted is not None else None
    return (data is not None and data.tag == _CIPHER_DATA and encrypted is not None
            and encrypted.tag == _ENCRYPTED_DATA and info is not None
            and info.tag == _GROUP_INFORMATION)


def _parse_outer(data: bytes, max_bytes: int, view: str) -> tuple[etree._Element, str | None]:
    """The outer file as a tree without the group information's ciphertext.

    Parsed incrementally: when the ciphertext's element ends, the S1SP view takes its text
    and leaves "AA==" in the tree (the schema still sees a base64 value there); the DCO view
    drops the text, then swaps the whole EncryptedS1SPGroupInformation for a fixed
    placeholder, so nothing of it, well-formed or garbage, reaches DCO code or decides a DCO
    outcome, and the DCO never holds the S1SP ciphertext beyond the parser's own buffer.
    """
    _check_bytes(data, max_bytes, "file", BYTES_PER_TAG_OUTER)
    ciphertext: str | None = None
    events = etree.iterparse(io.BytesIO(data), events=("end",),
                             tag=(_CIPHER_VALUE, _GROUP_INFORMATION), **_PARSER_OPTIONS)
    try:
        for _, el in events:
            if el.tag == _CIPHER_VALUE:
                if _is_group_ciphertext(el):
                    if view == "s1sp" and ciphertext is None:
                        ciphertext = el.text or ""
                    el.text = "AA=="
            elif view == "dco" and el.getparent() is not None:
                el.getparent().replace(el, etree.fromstring(_PLACEHOLDER))
        root = events.root
    except etree.XMLSyntaxError as exc:
        raise _syntax_error(exc, "file") from None
    _no_doctype(root, "file")
    return root, ciphertext


def read_file(data: bytes, *, max_bytes: int, max_depth: int, view: str) -> MigrationFile:
    """The file as `view` ('s1sp' or 'dco') may see it (see `_parse_outer`)."""
    with tracing.span("xml.parse", what="file", view=view, bytes=len(data)):
        root, ciphertext = _parse_outer(data, max_bytes, view)
    if root.tag != f"{{{NS}}}MigrationGroupEncryptedFile":
        _check_depth(root, max_depth, "the file")
        raise error("SCHEMA_INVALID", "the root element is not MigrationGroupEncryptedFile")
    validate(root, MIGRATION_FILE, "the file", max_depth)
    header = _header(root)
    entries = _master_key_entries(root)
    group_info = None
    if view == "s1sp":
        ed = root.find("m:EncryptedS1SPGroupInformation/xenc:EncryptedData", NSMAP)
        if ed.get("Type") != f"{XENC}Element":
            raise error("SCHEMA_INVALID", "EncryptedData Type must be xmlenc#Element")
        method = ed.find("xenc:EncryptionMethod", NSMAP)
        ek = ed.find("ds:KeyInfo/xenc:EncryptedKey", NSMAP)
        if ek is None:
            raise error("SCHEMA_INVALID", "EncryptedData carries no EncryptedKey")
        del root
        group_info = EncryptedData(
            algorithm=(method.get("Algorithm") or "") if method is not None else "",
            encrypted_key=_encrypted_key(ek, "EncryptedKey CipherValue"),
            cipher_value=strict_base64(ciphertext, "EncryptedData CipherValue"))
    return MigrationFile(header, entries, group_info)


def parse_plaintext(data: bytes, group_id: str, *, max_bytes: int,
                    max_depth: int) -> etree._Element:
    """The decrypted group information: hardened again (it is still outside input)."""
    with tracing.span("xml.parse", what="group information", bytes=len(data)):
        root = parse_hardened(data, max_bytes=max_bytes, max_depth=max_depth,
                              what="the decrypted group information")
    expected = ROOT_FOR_GROUP[group_id]
    local = etree.QName(root).localname
    if etree.QName(root).namespace != NS or local not in ROOT_FOR_GROUP.values():
        _check_depth(root, max_depth, "the decrypted group information")
        raise error("SCHEMA_INVALID", "the decrypted root is not group information")
    if local != expected:
        raise error("PLAINTEXT_ROOT_MISMATCH",
                    f"GroupID {group_id} needs {expected}, the plaintext is {local}")
    validate(root, GROUP_INFORMATION, "the decrypted group information", max_depth)
    inner = _text(root, "m:GroupID")
    if inner != group_id:
        raise error("GROUP_ID_MISMATCH",
                    f"the plaintext's GroupID {inner!r} is not the header's {group_id!r}")
    return root
