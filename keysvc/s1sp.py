"""S1SP path: decrypt group information in the S1SP token, validate, store keys wrapped.

Where plaintext keys live: the decrypted group information (and the key hex inside it) is
in process memory from the GCM decryption until this request returns; each key's bytes are
turned into a session object (the C_CreateObject buffer is zeroed after the call),
check-valued and wrapped under the S1SP storage key inside the token, and destroyed as
soon as it is wrapped (SoftHSM2 keeps a session object in about 7 KiB: 35,000
installations' objects held to the end took 1 GB, and destroying each is cheaper than
keeping it, because the token's lookups grow with its objects). Nothing logs, raises or
returns a key's bits.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from lxml import etree
from sqlalchemy.exc import IntegrityError

from keysvc import tracing, transport
from keysvc.app import App, Caller
from keysvc.custody import versions
from keysvc.device_certificate import CertificateVerdict
from keysvc.domain import InvalidEUI64, Problem, normalise_eui64
from keysvc.errors import error
from keysvc.hsm import HsmOperationFailed
from keysvc.hsm import keys as hk
from keysvc.records.stored_keys import StoredKey
from keysvc.results import (
    DeviceKey,
    GroupResult,
    InstallationResult,
    group_result_from_json,
    to_json,
)
from keysvc.xmlfile import AES256_GCM, DP_GROUPS, NS, NSMAP, parse_plaintext, read_file

SERVICE = "s1sp"
BREATHE_EVERY = 128  # installations between chances for other callers to use the HSM
ROLE_OF = {"AuthenticationKey": "AUTHENTICATION", "EncryptionKey": "ENCRYPTION",
           "PrepaymentKey": "PREPAYMENT"}


@dataclass
class _Installation:
    """One Installation while it is being checked: problems pile up, keys wait to be wrapped."""

    chf: str
    esme: str = ""
    gsme: str = ""
    problems: list[Problem] = field(default_factory=list)
    # (device, role, name, bits) until wrapped, then dropped. Never shown.
    keys: list[tuple[str, str, str, bytes]] = field(default_factory=list, repr=False)
    # (device, role, name, kcv) of each key once wrapped.
    kcvs: list[tuple[str, str, str, str]] = field(default_factory=list)
    verdict: CertificateVerdict | None = None
    # (CHF, ESME) as written, to pair with its MasterKeyEntry even when malformed; internal
    # only, never returned (it comes from the decrypted plaintext).
    pairing: tuple[str, str] = field(default=("", ""), repr=False)
    device_ids: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- entry point
def process_group_information(app: App, caller: Caller, data: bytes) -> GroupResult:
    s = app.settings
    mf = read_file(data, max_bytes=s.max_file_bytes, max_depth=s.max_xml_depth, view=SERVICE)
    h = mf.header
    file_digest = transport.digest(data)
    earlier = transport.stored_result(app, h.migration_file_id, SERVICE, file_digest,
                                      group_result_from_json)
    if earlier is not None:
        return earlier
    transport.check_originator(h)
    ed, mf = mf.group_information, dataclasses.replace(mf, group_information=None)
    assert ed is not None  # read_file's s1sp view always has it
    if ed.algorithm != AES256_GCM:
        raise error("UNSUPPORTED_ALGORITHM", f"content encryption {ed.algorithm!r} is not "
                                             "supported")
    key = transport.resolve_transport_key(app, ed.encrypted_key, "S1SP_TRANSPORT", h)
    with tracing.span("hsm.decrypt_group_information", bytes=len(ed.cipher_value)):
        plaintext = _decrypt(app, key, ed)
    del ed  # the ciphertext: 48 MB of a 64 MiB file
    root = parse_plaintext(plaintext, h.group_id, max_bytes=s.max_file_bytes,
                           max_depth=s.max_xml_depth)
    del plaintext
    with tracing.span("validate_installations") as current:
        installations, orphans, apply_certificate_verdicts = _validate(
            app, root, h.group_id, mf.master_key_entries)
        tracing.annotate(current, installations=len(installations))
    del root
    _reject_devices_already_stored(app, installations)
    with tracing.span("hsm.wrap_device_keys") as current:
        wrapped = _wrap_accepted(app, installations, h.migration_file_id)
        tracing.annotate(current, keys=len(wrapped))
    with tracing.span("certificates.verdicts"):
        apply_certificate_verdicts()
    wrapped = _drop_rejected(installations, wrapped)
    result = GroupResult(h.migration_file_id, h.group_id, h.originator_id,
                         tuple(_result(i) for i in installations) + tuple(orphans))
    now = app.clock()
    sealed = app.records.device_keys.sealed(wrapped)  # only the rows stored share trees

    def write_rows(conn) -> None:
        app.records.device_keys.insert_many(conn, sealed, now)
    try:
        raced = transport.store_once(app, h.migration_file_id, SERVICE, file_digest,
                                     to_json(result), write_rows, group_result_from_json)
    except IntegrityError:
        # Another file (another replica) stored keys for one of these devices after the
        # check above: reject those installations as the check would have, and store again.
        _reject_devices_already_stored(app, installations)
        wrapped = _drop_rejected(installations, wrapped)
        result = GroupResult(h.migration_file_id, h.group_id, h.originator_id,
                             tuple(_result(i) for i in installations) + tuple(orphans))
        sealed = app.records.device_keys.sealed(wrapped)  # sealed again: fewer rows now
        raced = transport.store_again(app, lambda: transport.store_once(
            app, h.migration_file_id, SERVICE, file_digest, to_json(result), write_rows,
            group_result_from_json))
    return raced or result


def _decrypt(app: App, key: transport.TransportKey, ed) -> bytes:
    """Unwrap the content key and decrypt, both inside the S1SP token."""
    if len(ed.cipher_value) < 12 + 16:
        raise error("DECRYPTION_FAILED", "CipherValue is shorter than IV and tag")
    return app.partitions.s1sp.run(lambda sess: _decrypt_in(sess, key, ed))


def _decrypt_in(sess, key: transport.TransportKey, ed) -> bytes:
    try:
        content_key = transport.unwrap(sess, key, ed.encrypted_key, hk.CONTENT_USAGE)
    except HsmOperationFailed:
        raise error("KEY_UNWRAP_FAILED", "the content key does not unwrap under "
                                         f"{key.name}") from None
    try:
        if hk.key_length(content_key, hk.find_key(sess, versions.storage(sess)[1])) != 32:
            raise error("KEY_UNWRAP_FAILED", "the content key is not 256 bits")
        try:
            return hk.gcm_decrypt(content_key, ed.cipher_value[:12], ed.cipher_value[12:])
        except HsmOperationFailed:
            raise error("DECRYPTION_FAILED", "the GCM tag does not verify") from None
    finally:
        hk.destroy(content_key)


# --------------------------------------------------------------------------- validation
def _eui(text: str, what: str, inst: _Installation) -> str:
    try:
        return normalise_eui64(text)
    except InvalidEUI64:
        inst.problems.append(Problem("INVALID_EUI64", f"{what} is not a well-formed EUI-64",
                                     what))
        # Never echo it: text from the decrypted plaintext may be anything, a key included.
        return ""


def _key_bits(text: str | None, name: str, device: str, inst: _Installation,
              required: bool) -> bytes | None:
    field_name = f"{device}/{name}"
    if text is None or not text.strip():
        if required:
            inst.problems.append(Problem("MISSING_KEY", f"{name} is missing for {device}",
                                         field_name))
        return None
    text = text.strip()
    try:
        if len(text) != 32:
            raise ValueError
        bits = binascii.unhexlify(text)
    except (ValueError, binascii.Error):
        inst.problems.append(Problem("INVALID_KEY", f"{name} for {device} is not 32 hex "
                                                    "digits", field_name))
        return None
    if len(set(bits)) == 1:
        inst.problems.append(Problem("INVALID_KEY", f"{name} for {device} has all bytes "
                                                    "equal", field_name))
        return None
    return bits


def _pairing_form(text: str) -> str:
    """How an identifier is compared between an Installation and a MasterKeyEntry: its
    normal EUI-64 form if it has one, else as written. Each identifier on its own, so that
    one malformed DeviceID does not change how its CHF is matched."""
    try:
        return normalise_eui64(text)
    except InvalidEUI64:
        return (text or "").strip()


def _tag(name: str) -> str:
    return f"{{{NS}}}{name}"


_CHF, _CERTIFICATE, _DEVICE_ID = _tag("CHFIdentifier"), _tag("DeviceCertificate"), _tag("DeviceID")
_ESME, _GSME, _HLA = _tag("ESMEDetail"), _tag("GSMEDetail"), _tag("HighLevelAssociation")
_PREPAY_DETAILS, _PREPAYMENT_KEY = _tag("PrePayDetails"), _tag("PrepaymentKey")
_HLA_KEYS = tuple((name, _tag(name)) for name in ("AuthenticationKey", "EncryptionKey",
                                                  "PrepaymentKey"))
_SECRET_KEY = _tag("SecretKey")
Children = dict[object, etree._Element]


def _children(el: etree._Element | None) -> Children:
    """An element's children by tag, read in one pass (a path search per child cost 6 µs,
    a tenth of an installation's reading). The schema has already checked the plaintext:
    each of these children appears at most once (SecretKey, which repeats, is read apart)."""
    return {} if el is None else {c.tag: c for c in el}


def _text(children: Children, tag: str, default: str | None = "") -> str | None:
    """`findtext`: the child's text ("" when empty), or `default` without such a child."""
    el = children.get(tag)
    return default if el is None else (el.text or "")


def _read_installation(kids: Children, group_id: str) -> _Installation:
    inst = _Installation(chf="")
    chf_text = _text(kids, _CHF) or ""
    inst.chf = _eui(chf_text, "CHFIdentifier", inst)
    esme = kids[_ESME]
    esme_kids = _children(esme)
    esme_text = _text(esme_kids, _DEVICE_ID) or ""
    inst.esme = _eui(esme_text, "ESMEDetail/DeviceID", inst)
    inst.pairing = (_pairing_form(chf_text), _pairing_form(esme_text))
    inst.device_ids.append(inst.esme)
    gsme = kids.get(_GSME)
    gsme_kids = _children(gsme)
    if gsme is not None:
        inst.gsme = _eui(_text(gsme_kids, _DEVICE_ID) or "", "GSMEDetail/DeviceID", inst)
        inst.device_ids.append(inst.gsme)
    if group_id in DP_GROUPS:
        hla = _children(esme_kids[_HLA])
        for name, tag in _HLA_KEYS:
            required = name != "PrepaymentKey" or group_id == "EA"
            bits = _key_bits(_text(hla, tag, None), name, inst.esme, inst, required)
            if bits:
                inst.keys.append((inst.esme, ROLE_OF[name], name, bits))
        pre = gsme_kids.get(_PREPAY_DETAILS)
        if pre is not None:
            bits = _key_bits(_text(_children(pre), _PREPAYMENT_KEY, None), "PrepaymentKey",
                             inst.gsme, inst, True)
            if bits:
                inst.keys.append((inst.gsme, "PREPAYMENT", "PrepaymentKey", bits))
    else:
        for device_el, device in ((esme, inst.esme), (gsme, inst.gsme)):
            if device_el is None:
                continue
            names = Counter(k.get("Name", "") for k in device_el.iterchildren(_SECRET_KEY))
            for dup in (n for n, c in names.items() if c > 1):
                inst.problems.append(Problem("DUPLICATE_IDENTIFIER", f"SecretKey Name {dup!r} "
                                             f"repeats for {device}", f"{device}/SecretKey"))
            for k in device_el.iterchildren(_SECRET_KEY):
                name = k.get("Name", "")
                bits = _key_bits(k.text, name or "SecretKey", device, inst, True)
                if bits and names[name] == 1:
                    inst.keys.append((device, "SECRET", name, bits))
    return inst


def _certificate_input(kids: Children, inst: _Installation) -> tuple[bytes, str | None] | None:
    """What the certificate check needs: the DER, and the CHF it must name (if readable)."""
    text = _text(kids, _CERTIFICATE, None)
    if text is None:
        return None
    try:
        der = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        der = b""
    chf_ok = not any(p.field == "CHFIdentifier" for p in inst.problems)
    return der, (inst.chf if chf_ok else None)


def _apply_verdicts(installations: list[_Installation], indexes: list[int],
                    verdicts: list[CertificateVerdict]) -> None:
    for i, verdict in zip(indexes, verdicts):
        inst = installations[i]
        inst.verdict = verdict
        if not verdict.valid:
            codes = ", ".join(p.code for p in verdict.problems)
            inst.problems.append(Problem("DEVICE_CERTIFICATE_INVALID", codes,
                                         "DeviceCertificate"))


def _validate(app: App, root: etree._Element, group_id: str, entries
              ) -> tuple[list[_Installation], list[InstallationResult], Callable[[], None]]:
    """Read and check every Installation; the certificate checks run in the background
    (app.certificates) while the caller wraps keys, and the returned function waits for
    them and applies their verdicts."""
    installations: list[_Installation] = []
    cert_indexes: list[int] = []
    cert_items: list[tuple[bytes, str | None]] = []
    for el in root.iterfind("m:Installation", NSMAP):
        kids = _children(el)
        inst = _read_installation(kids, group_id)
        item = _certificate_input(kids, inst)
        if item is not None:
            cert_indexes.append(len(installations))
            cert_items.append(item)
        installations.append(inst)
    pending = app.certificates.submit(cert_items, app.clock())

    def apply_certificate_verdicts() -> None:
        _apply_verdicts(installations, cert_indexes, pending.result())
    # Identifiers must be unique across the file: a repeated one rejects every holder. Each
    # occurrence counts, also within one installation (a GSME with its own ESME's DeviceID).
    seen = Counter(x for i in installations for x in (i.chf, *i.device_ids) if x)
    repeated = {k for k, c in seen.items() if c > 1}
    for inst in installations:
        for x in sorted({inst.chf, *inst.device_ids} & repeated):
            inst.problems.append(Problem("DUPLICATE_IDENTIFIER", f"{x} appears more than once "
                                                                 "in the file", x))
    # Each Installation needs exactly one MasterKeyEntry for its CHF and ESME, and the
    # reverse (the S1SP sees the entries' identifiers, never their keys).
    pairs = Counter((_pairing_form(e.chf_identifier), _pairing_form(e.device_id))
                    for e in entries)
    matched = {i.pairing for i in installations}
    for inst in installations:
        n = pairs.get(inst.pairing, 0)
        if n != 1:
            inst.problems.append(Problem(
                "MASTER_KEY_ENTRY_MISSING" if n == 0 else "DUPLICATE_IDENTIFIER",
                "no MasterKeyEntry for this CHF and ESME" if n == 0
                else "more than one MasterKeyEntry for this CHF and ESME", "MasterKeyEntry"))
    orphans = [InstallationResult(chf, "REJECTED", (Problem(
        "INSTALLATION_MISSING", "a MasterKeyEntry has no Installation", "MasterKeyEntry"),),
        esme_device_id=device)
        for (chf, device) in pairs if (chf, device) not in matched]
    return installations, orphans, apply_certificate_verdicts


def _reject_devices_already_stored(app: App, installations: list[_Installation]) -> None:
    """A device keeps the keys of the file that first brought it; a later file is refused."""
    devices = sorted({d for i in installations if not i.problems for d in i.device_ids if d})
    stored = app.records.device_keys.files_of(devices)
    for inst in installations:
        for d in inst.device_ids:
            if d in stored:
                inst.problems.append(Problem("DUPLICATE_IDENTIFIER", f"{d} already has keys "
                                             f"from MigrationFileID {stored[d]}", d))


# --------------------------------------------------------------------------- wrapping
Wrapped = list[StoredKey]  # sealed once the rows to store are final (`StoredKeys.sealed`)


def _wrap_accepted(app: App, installations: list[_Installation], file_id: str) -> Wrapped:
    """Each key of a so-far valid installation: into the token, check value, wrap under the
    storage key, destroy. Rows of installations whose certificate then fails are dropped
    (`_drop_rejected`) before the rest are sealed and stored."""
    token = app.partitions.s1sp

    def work(sess) -> tuple[Wrapped, list[list[tuple[str, str, str, str]]]]:
        # Pure until it returns, so that Token.run may repeat it after re-reading the token.
        sess.retire_after_use()  # for the session copy of the storage key
        version, storage_label = versions.storage(sess)
        storage = hk.session_copy(sess, storage_label)
        rows: list[StoredKey] = []
        done_all = []
        for n, inst in enumerate(installations, 1):
            if n % BREATHE_EVERY == 0:
                token.breathe()
            done: list[tuple[str, str, str, str]] = []
            if not inst.problems:
                for device, role, name, bits in inst.keys:
                    obj = hk.create_session_key(sess, bits, hk.PLAINTEXT_KEY_USAGE)
                    kcv = hk.check_value(obj)
                    k = StoredKey(device, role, name, inst.chf, file_id, version,
                                  kcv, hk.wrap(storage, obj))
                    hk.destroy(obj)
                    rows.append(k)
                    done.append((device, role, name, kcv))
            done_all.append(done)
        return rows, done_all

    rows, done_all = token.run(work)
    for inst, done in zip(installations, done_all):
        inst.keys, inst.kcvs = [], done  # the bits are dropped: only KCVs remain
    return rows


def _drop_rejected(installations: list[_Installation], rows: Wrapped) -> Wrapped:
    rejected = {i.chf for i in installations if i.problems}
    for inst in installations:
        if inst.problems:
            inst.keys.clear()
            inst.kcvs.clear()
    return [r for r in rows if r.chf_identifier not in rejected]


def _result(inst: _Installation) -> InstallationResult:
    ok = not inst.problems
    return InstallationResult(
        inst.chf, "ACCEPTED" if ok else "REJECTED", tuple(inst.problems), inst.esme, inst.gsme,
        tuple(DeviceKey(d, r, n, k) for (d, r, n, k) in inst.kcvs) if ok else (),
        inst.verdict)


# --------------------------------------------------------------------------- queries
def _stored_keys(app: App, device_id: str, roles: tuple[str, ...]) -> list[StoredKey]:
    """The device's stored keys, each verified against its seal before any use."""
    try:
        device_id = normalise_eui64(device_id)
    except InvalidEUI64:
        raise error("INVALID_EUI64", "device_id is not a well-formed EUI-64") from None
    keys = app.records.device_keys.of_device(device_id, roles)
    if not keys:
        raise error("DEVICE_KEY_NOT_FOUND", f"no stored key for {device_id}")
    return keys


def verify_prepayment_key(app: App, device_id: str, expected_kcv: str,
                          method: str = "CMAC") -> bool:
    """TMAD 4.49: compare a check value computed in the HSM; the key never leaves it."""
    k = _stored_keys(app, device_id, ("PREPAYMENT",))[0]
    return transport.stored_key_matches(app.partitions.s1sp, k, expected_kcv, method)


@dataclass(frozen=True)
class ExportedKey:
    role: str
    name: str
    kcv: str
    wrapped: bytes


def export_device_keys(app: App, device_id: str, roles: list[str],
                       export_key_name: str) -> list[ExportedKey]:
    """The only way device keys leave: RFC 5649 under an EXPORT key, never in the clear.
    Each KCV returned is computed in the HSM from the key that was unwrapped and exported."""
    k = app.records.keys.get(export_key_name, for_use=True)
    if k is None or k.state == "DESTROYED":
        raise error("UNKNOWN_TRANSPORT_KEY", f"no export key named {export_key_name!r}")
    if k.purpose != "EXPORT":
        raise error("WRONG_KEY_PURPOSE", f"{export_key_name!r} is not an EXPORT key")
    if k.state != "ENABLED":
        raise error("TRANSPORT_KEY_DISABLED", f"export key {export_key_name!r} is disabled")
    stored = _stored_keys(app, device_id, tuple(sorted(set(roles))))

    def work(sess) -> list[ExportedKey]:
        out = []
        export = hk.find_key(sess, export_key_name)
        for r in stored:
            storage = versions.stored_row_key(sess, r.key_version)
            obj = hk.unwrap(sess, storage, r.wrapped, hk.Unwrap.AES_KW, usage=hk.DEVICE_USAGE)
            try:
                out.append(ExportedKey(r.role, r.name, hk.check_value(obj),
                                       hk.wrap(export, obj, pad=True)))
            finally:
                hk.destroy(obj)
        return out
    return app.partitions.s1sp.run(work)


__all__ = ["process_group_information", "verify_prepayment_key", "export_device_keys",
           "ExportedKey"]
