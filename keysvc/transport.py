"""What the S1SP and DCO paths share: originator rules, transport keys, storing once.

Both read the same header and the same kinds of xenc:EncryptedKey, and both must store a
file's result exactly once per MigrationFileID, even when two replicas receive it at once.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from sqlalchemy.exc import IntegrityError

from keysvc.app import App
from keysvc.custody import versions
from keysvc.domain import InvalidKcv, normalise_kcv
from keysvc.errors import error
from keysvc.hsm import HsmOperationFailed
from keysvc.hsm import keys as hk
from keysvc.records.stored_keys import StoredKey
from keysvc.xmlfile import KEY_TRANSPORTS, KW_AES256, EncryptedKey, MigrationHeader

R = TypeVar("R")

# TMAD Clause 11.1: the Requesting Party may itself populate the encrypted elements only
# for EB and EC; every other group must come from the SMSO.
ORIGINATORS_FOR_GROUP = {"EB": ("SMSO", "RequestingParty"), "EC": ("SMSO", "RequestingParty")}


OWNER_TYPE_OF = {"SMSO": "SMSO", "RequestingParty": "REQUESTING_PARTY"}


@dataclass(frozen=True)
class TransportKey:
    name: str
    algorithm: str
    partition: str


def check_originator(header: MigrationHeader) -> None:
    allowed = ORIGINATORS_FOR_GROUP.get(header.group_id, ("SMSO",))
    if header.originator_type not in allowed:
        raise error("ORIGINATOR_NOT_PERMITTED",
                    f"GroupID {header.group_id} may not come from {header.originator_type}")


def resolve_transport_key(app: App, ek: EncryptedKey, purpose: str,
                          header: MigrationHeader) -> TransportKey:
    """The named key, if it exists, is enabled, has this purpose and this originator; its
    record is verified (seal, anchor) and its token object checked against it."""
    if ek.algorithm not in KEY_TRANSPORTS:
        raise error("UNSUPPORTED_ALGORITHM", f"key transport {ek.algorithm!r} is not supported")
    row = app.records.keys.get(ek.key_name, for_use=True)
    if row is None or row.state == "DESTROYED":
        raise error("UNKNOWN_TRANSPORT_KEY", f"no transport key named {ek.key_name!r}")
    if row.state != "ENABLED":
        raise error("TRANSPORT_KEY_DISABLED", f"transport key {ek.key_name!r} is disabled")
    if row.purpose != purpose:
        raise error("WRONG_KEY_PURPOSE", f"key {ek.key_name!r} is a {row.purpose} key, "
                                         f"not {purpose}")
    if row.is_aes != (ek.algorithm == KW_AES256):
        raise error("WRONG_KEY_PURPOSE", f"key {ek.key_name!r} ({row.algorithm}) cannot be "
                                         f"used with {ek.algorithm}")
    if row.is_aes and (row.owner_id != header.originator_id
                       or row.owner_type != OWNER_TYPE_OF.get(header.originator_type)):
        # The header's OriginatorType is only a claim; the key's recorded owner is what the
        # key ceremony established, so "EA: SMSO only" is checked against the key.
        raise error("ORIGINATOR_NOT_PERMITTED",
                    f"transport key {ek.key_name!r} is not shared with "
                    f"{header.originator_type} {header.originator_id}")
    if not row.is_aes and header.originator_id not in row.allowed_originators:
        raise error("ORIGINATOR_NOT_PERMITTED",
                    f"{header.originator_id} is not registered to send to {ek.key_name!r}")
    return TransportKey(row.name, row.algorithm, row.partition)


def unwrap(s: Any, key: TransportKey, ek: EncryptedKey, usage: dict, *,
           in_loop: bool = False) -> Any:
    """C_UnwrapKey under the transport key; HsmOperationFailed means the input is bad.

    `in_loop`: one of many keys in a retired session; an AES unwrap then gives a bare
    `hk.SessionKey`, which is all `hk.wrap` and `hk.check_value` need."""
    if key.algorithm == "AES":
        kek = hk.session_copy(s, key.name) if s.retire else hk.find_key(s, key.name)
        if in_loop:
            return hk.unwrap_session_key(s, kek, ek.cipher_value, hk.Unwrap.AES_KW, usage)
        return hk.unwrap(s, kek, ek.cipher_value, hk.Unwrap.AES_KW, usage=usage)
    return hk.unwrap(s, hk.find_private_key(s, key.name), ek.cipher_value,
                     hk.Unwrap.RSA_OAEP_SHA1, usage=usage)


def stored_key_matches(token: Any, stored: StoredKey, expected_kcv: str, method: str) -> bool:
    """Compare a stored key's check value, computed in the HSM from the key the row
    actually unwraps to, with the caller's (VerifyPrepaymentKey, VerifyMasterKey). The row
    was verified against its seal by the records layer before it got here."""
    expected = expected_kcv_of(expected_kcv)

    def work(sess) -> str:
        storage = versions.stored_row_key(sess, stored.key_version)
        wrapped = stored.wrapped
        # A CMAC check value (the usual one) on a session key made by a direct call, as the
        # per-key loops do (keysvc/hsm/direct.py: python-pkcs11 adds eleven calls per key object).
        obj = hk.unwrap_session_key(sess, storage, wrapped, hk.Unwrap.AES_KW, hk.KCV_USAGE) \
            if hk.Kcv(method) is hk.Kcv.CMAC else \
            hk.unwrap(sess, storage, wrapped, hk.Unwrap.AES_KW, usage=hk.KCV_USAGE)
        try:
            return hk.check_value(obj, hk.Kcv(method))
        finally:
            hk.destroy(obj)
    return hmac.compare_digest(token.run(work), expected)


def expected_kcv_of(text: str) -> str:
    try:
        return normalise_kcv(text)
    except InvalidKcv as exc:
        raise error("INVALID_REQUEST", str(exc)) from None


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored_result(app: App, file_id: str, service: str, file_digest: str,
                  decode: Callable[[str], R]) -> R | None:
    """The earlier result for this MigrationFileID (its seal verified), or None; other
    bytes are refused."""
    row = app.records.files.get(file_id, service)
    if row is None:
        stored = app.records.device_keys if service == "s1sp" else app.records.master_keys
        if not stored.has_file(file_id):
            return None
        # Keys of this file, but no result row. The two reads are two snapshots: another
        # call may have committed both in between. They commit together, so a row still
        # missing when read again was removed.
        row = app.records.files.get(file_id, service)
        if row is None:
            raise app.records.refuse(None, f"migration_files/{service}/{file_id}",
                                     "is missing while keys stored from that file exist")
    if row.digest != file_digest:
        raise error("FILE_ALREADY_PROCESSED",
                    f"MigrationFileID {file_id} was processed with other content")
    return decode(row.result)


def store_once(app: App, file_id: str, service: str, file_digest: str, result_json: str,
               write_rows: Callable[[Any], None], decode: Callable[[str], R]) -> R | None:
    """Insert the file row and its key rows in one transaction.

    The file row's primary key is the lock: a concurrent writer of the same MigrationFileID
    (another thread or replica) fails the insert, rolls back all its rows, and returns the
    winner's stored result instead. Returns None when this call stored the result.
    """
    try:
        with app.store.tx() as conn:
            app.records.files.insert(conn, file_id, service, file_digest, result_json,
                                     app.clock())
            write_rows(conn)
        return None
    except IntegrityError:
        found = stored_result(app, file_id, service, file_digest, decode)
        if found is None:
            raise
        return found


def store_again(app: App, store: Callable[[], R]) -> R:
    """The second try of a store that raced (IntegrityError): a second collision is not
    a race any more, but rows the database holds without their file's result."""
    try:
        return store()
    except IntegrityError:
        raise app.records.refuse(None, "migration_files", "stored keys collide with rows "
                                 "that no stored result accounts for") from None


__all__ = ["TransportKey", "check_originator", "resolve_transport_key", "unwrap", "digest",
           "stored_result", "store_once", "store_again", "HsmOperationFailed"]
