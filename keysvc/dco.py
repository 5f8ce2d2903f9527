"""DCO path (TMAD Clause 15.7): unwrap each EncryptedMasterKey inside the DCO token.

The DCO reads only MigrationHeader and EncryptedMasterKey (see xmlfile's DCO view) and holds
only the DCO token. A master key goes from C_UnwrapKey under the DCO transport key to
C_WrapKey under the DCO storage key; its value is never read into this process.
"""
from __future__ import annotations

from collections import Counter

from sqlalchemy.exc import IntegrityError

from keysvc import tracing, transport
from keysvc.app import App, Caller
from keysvc.custody import versions
from keysvc.domain import InvalidEUI64, Problem, normalise_eui64
from keysvc.errors import error
from keysvc.hsm import HsmOperationFailed
from keysvc.hsm import keys as hk
from keysvc.records.stored_keys import MasterKeys, StoredKey
from keysvc.results import MasterKeyResult, MasterKeysResult, master_keys_result_from_json, to_json
from keysvc.xmlfile import read_file

SERVICE = "dco"
BREATHE_EVERY = 512  # entries between chances for other callers to use the HSM
MASTER_USAGE = hk.DEVICE_USAGE  # session copy: check value, then wrapped for storage


def process_master_keys(app: App, caller: Caller, data: bytes, *,
                        store: bool) -> MasterKeysResult:
    """ValidateMasterKeys (store=False) and UnwrapMasterKeys (store=True)."""
    s = app.settings
    mf = read_file(data, max_bytes=s.max_file_bytes, max_depth=s.max_xml_depth, view=SERVICE)
    h = mf.header
    file_digest = transport.digest(data)
    if store:
        earlier = transport.stored_result(app, h.migration_file_id, SERVICE, file_digest,
                                          master_keys_result_from_json)
        if earlier is not None:
            return earlier
    transport.check_originator(h)
    # Every entry's algorithm and key are checked (each distinct pair once).
    keys = {(ek.key_name, ek.algorithm): transport.resolve_transport_key(
                app, ek, "DCO_TRANSPORT", h)
            for ek in {(e.encrypted_key.key_name, e.encrypted_key.algorithm): e.encrypted_key
                       for e in mf.master_key_entries}.values()}

    problems: list[list[Problem]] = []
    ids: list[tuple[str, str]] = []
    for e in mf.master_key_entries:
        p: list[Problem] = []
        ids.append((_eui(e.chf_identifier, "CHFIdentifier", p),
                    _eui(e.device_id, "DeviceID", p)))
        problems.append(p)
    counts = Counter(x for pair in ids for x in pair)
    for (chf, dev), p in zip(ids, problems):
        for x in sorted({chf, dev}):
            if counts[x] > 1:
                p.append(Problem("DUPLICATE_IDENTIFIER", f"{x} appears in more than one "
                                                         "MasterKeyEntry", x))
    # ValidateMasterKeys gives the verdict UnwrapMasterKeys would, this one included.
    stored_before = _devices_already_stored(app, ids, h.migration_file_id)

    def unwrap_all(sess) -> list[tuple[str, StoredKey | None, list[Problem]]]:
        sess.retire_after_use()  # for the session copy of the storage key
        version, storage_label = versions.storage(sess)
        storage = hk.session_copy(sess, storage_label)
        out = []
        for n, (e, p, q, (chf, dev)) in enumerate(
                zip(mf.master_key_entries, problems, stored_before, ids), 1):
            if n % BREATHE_EVERY == 0:
                app.partitions.dco.breathe()
            found: list[Problem] = []
            kcv, wrapped = ("", None) if p or q else _unwrap_one(
                sess, keys[(e.encrypted_key.key_name, e.encrypted_key.algorithm)], e,
                storage, store, found)
            k = None
            if wrapped is not None:
                k = StoredKey(dev, MasterKeys.ROLE, MasterKeys.NAME, chf, h.migration_file_id,
                              version, kcv, wrapped)
            out.append((kcv, k, found))
        return out
    with tracing.span("hsm.unwrap_master_keys", entries=len(mf.master_key_entries)):
        unwrapped = app.partitions.dco.run(unwrap_all)
    now = app.clock()

    def assemble(stored: list[list[Problem]]) -> tuple[MasterKeysResult, list[StoredKey]]:
        entries, rows = [], []
        for (chf, dev), p, q, (kcv, k, found) in zip(ids, problems, stored, unwrapped):
            p = p + q + found
            if k is not None and not p:
                rows.append(k)
            entries.append(MasterKeyResult(chf, dev, "REJECTED" if p else "ACCEPTED",
                                           tuple(p), "" if p else kcv))
        return MasterKeysResult(h.migration_file_id, h.group_id, tuple(entries)), rows

    result, rows = assemble(stored_before)
    if not store:
        return result

    def store_result() -> MasterKeysResult | None:
        # Sealed once the rows to store are final, and again after a re-assembly: only the
        # rows stored may share a seal tree (StoredKeys.sealed).
        sealed = app.records.master_keys.sealed(rows)

        def write_rows(conn) -> None:
            app.records.master_keys.insert_many(conn, sealed, now)
        return transport.store_once(app, h.migration_file_id, SERVICE, file_digest,
                                    to_json(result), write_rows, master_keys_result_from_json)
    try:
        raced = store_result()
    except IntegrityError:
        # Another file (another replica) stored a master key for one of these devices after
        # the check above: reject those entries as the check would have, and store again.
        result, rows = assemble(_devices_already_stored(app, ids, h.migration_file_id))
        raced = transport.store_again(app, store_result)
    return raced or result


def _eui(text: str, what: str, problems: list[Problem]) -> str:
    try:
        return normalise_eui64(text)
    except InvalidEUI64:
        problems.append(Problem("INVALID_EUI64", f"{what} is not a well-formed EUI-64", what))
        return (text or "")[:32]


def _unwrap_one(sess, key: transport.TransportKey, entry, storage, store: bool,
                problems: list[Problem]) -> tuple[str, bytes | None]:
    try:
        obj = transport.unwrap(sess, key, entry.encrypted_key, MASTER_USAGE, in_loop=True)
    except HsmOperationFailed:
        problems.append(Problem("KEY_UNWRAP_FAILED", "the EncryptedKey does not unwrap under "
                                f"{key.name} (integrity check failed)", "EncryptedKey"))
        return "", None
    # Wrapping under the storage key is both what we store and how we learn the length
    # (RFC 3394 adds 8 bytes): SoftHSM2 leaves CKA_VALUE_LEN 0 on unwrapped keys.
    # SoftHSM2 refuses to wrap a key under 16 bytes, zero-pads one that is not a whole
    # number of 8-byte blocks (15 bytes measure as 16), and refuses AES-CMAC with a key
    # that is not 16, 24 or 32 bytes: a failure of either is the wrong length too.
    # The session object is destroyed at once: one kept to the end of a large file costs
    # the token about 7 KiB, and destroying it is cheaper than keeping it.
    try:
        wrapped = hk.wrap(storage, obj)
        kcv = hk.check_value(obj)
    except HsmOperationFailed:
        wrapped, kcv = b"", ""
    finally:
        hk.destroy(obj)
    if len(wrapped) - 8 not in (16, 32):
        problems.append(Problem("KEY_UNWRAP_FAILED", "the master key is not 128 or 256 "
                                                     "bits", "EncryptedKey"))
        return "", None
    return kcv, (wrapped if store else None)


def _devices_already_stored(app: App, ids: list[tuple[str, str]], file_id: str
                            ) -> list[list[Problem]]:
    """Per entry: DUPLICATE_IDENTIFIER if its device already has a master key stored from
    another file. (This file's own rows mean it was processed: ValidateMasterKeys of it
    again finds its entries as good as they were.)"""
    stored = app.records.master_keys.files_of(sorted({d for _, d in ids if d}),
                                              not_file=file_id)
    return [[Problem("DUPLICATE_IDENTIFIER", f"{dev} already has a master key from "
                                             f"MigrationFileID {stored[dev]}", dev)]
            if dev in stored else [] for _, dev in ids]


def verify_master_key(app: App, device_id: str, expected_kcv: str, method: str = "CMAC") -> bool:
    """The stored master key's check value, computed in the HSM after its row's seal is
    verified (a row moved from another device does not verify)."""
    try:
        device_id = normalise_eui64(device_id)
    except InvalidEUI64:
        raise error("INVALID_EUI64", "device_id is not a well-formed EUI-64") from None
    keys = app.records.master_keys.get(device_id)
    if not keys:
        raise error("DEVICE_KEY_NOT_FOUND", f"no master key for {device_id}")
    return transport.stored_key_matches(app.partitions.dco, keys[0], expected_kcv,
                                        method)
