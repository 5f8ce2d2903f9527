"""Every field of the API bounded, in one table.

A request is checked against this table in the interceptor, once decoded and before any
domain code sees it: a field over its limit is INVALID_ARGUMENT INVALID_REQUEST naming the
field, and no error quotes the value. The README's "Limits" section is `table()`; a test
keeps the two equal, and another that every field of every request has a limit.

Strings count characters, bytes count bytes, repeated fields count elements (and each
element has the limit of its kind). An empty value is "not given": whether a field is
required is the domain's rule, not this table's. Migration files are bounded by the
`max_file_bytes` setting (FILE_TOO_LARGE) and by their schema.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from keysvc.errors import error

# Names, ids, owners, originators: what an officer reads on a screen (keyadmin._IDENTIFIER).
IDENTIFIER = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
# Free text (notes, reasons): no control character and no bidirectional override, so that
# a note cannot make the audit trail or an approver's screen read as something else.
TEXT = r"[^\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]*"
GROUP_IDS = ("AA", "BA", "CA", "CB", "EA", "EB", "EC")
YEAR_2000 = 946_684_800      # 2000-01-01T00:00:00Z
YEAR_2101 = 4_133_980_800    # 2101-01-01T00:00:00Z


@dataclass(frozen=True)
class Limit:
    max: int = 0             # characters, bytes or elements; 0: see `note`
    pattern: str = ""        # a string (each element) must match it whole
    low: int | None = None   # numbers: the range
    high: int | None = None
    item: int = 0            # repeated: each element's length
    note: str = ""           # the README's words, where the numbers are not all

    def describe(self, unit: str = "", repeated: bool = False) -> str:
        if self.low is not None:
            return self.note or f"{self.low} to {self.high}"
        if not self.max:
            return self.note
        if repeated:
            size = f"at most {self.max} elements" + (f" of at most {self.item} {unit}"
                                                     if self.item else "")
        else:
            size = f"at most {self.max} {unit}".rstrip()
        return ", ".join(p for p in (size, self.note) if p)


_ID = Limit(64, IDENTIFIER, note="letters, digits, `.` `_` `-`, starting with a letter or digit")
# Forms with a reason of their own (INVALID_EUI64, KCV checks) are the domain's to refuse.
_EUI = Limit(32, note="an EUI-64 (INVALID_EUI64 otherwise)")
_KCV = Limit(64, note="hex")
_CERT = 16 * 1024
# A whole request without a migration file, checked before it is parsed: the largest the
# table allows is about 300 KiB (an escrow of 16 certificates and 1,000 CHF identifiers).
REQUEST_BYTES = 1024 * 1024
_FILE = Limit(0, note="the `max_file_bytes` setting (64 MiB), then the schema")
_TEXT = Limit(4096, TEXT, note="no control or bidirectional-override characters")
_REASON = Limit(1024, TEXT, note="no control or bidirectional-override characters")
_NAME = Limit(64, r"[A-Za-z0-9][A-Za-z0-9 .'_-]{0,63}",
              note="ASCII letters, digits, spaces and `.` `'` `_` `-`")
_TIME = Limit(low=YEAR_2000, high=YEAR_2101 - 1, note="2000-01-01 to 2100-12-31 (UTC)")

LIMITS: dict[str, Limit] = {
    "ProcessGroupInformationRequest.file": _FILE,
    "ValidateMasterKeysRequest.file": _FILE,
    "UnwrapMasterKeysRequest.file": _FILE,
    "VerifyPrepaymentKeyRequest.device_id": _EUI,
    "VerifyPrepaymentKeyRequest.expected_kcv": _KCV,
    "VerifyMasterKeyRequest.device_id": _EUI,
    "VerifyMasterKeyRequest.expected_kcv": _KCV,
    "VerifyDeviceCertificateRequest.certificate": Limit(_CERT, note="DER or PEM"),
    "VerifyDeviceCertificateRequest.chf_identifier": _EUI,
    "VerifyDeviceCertificateRequest.intermediates": Limit(8, item=_CERT, note="DER or PEM"),
    "Timestamp.seconds": _TIME,
    "Timestamp.nanos": Limit(low=0, high=999_999_999),
    "ExportDeviceKeysRequest.device_id": _EUI,
    "ExportDeviceKeysRequest.roles": Limit(8),
    "ExportDeviceKeysRequest.export_key_name": _ID,
    "ReleaseRollbackCertificatesRequest.chf_identifier": _EUI,
    "ReleaseRollbackCertificatesRequest.reason": _REASON,
    "CreateImportJobRequest.name": Limit(64, r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}",
                                         note="letters, digits, spaces and `.` `_` `-`"),
    "ImportTransportKeyRequest.name": _ID,
    "ImportTransportKeyRequest.owner_id": _ID,
    "ImportTransportKeyRequest.expected_kcv": _KCV,
    "ImportTransportKeyRequest.wrapped_key": Limit(1024),
    "ImportTransportKeyRequest.import_job_id": _ID,
    "ImportTransportKeyRequest.component": Limit(32),
    "GenerateRecipientKeyRequest.name": _ID,
    "GenerateRecipientKeyRequest.allowed_originators": Limit(
        64, IDENTIFIER, item=64, note="identifiers"),
    "ApproveOperationRequest.operation_id": _ID,
    "ApproveOperationRequest.component": Limit(32),
    "ApproveOperationRequest.request_digest": Limit(64, note="hex (SHA-256)"),
    "GetOperationRequest.operation_id": _ID,
    "GetKeyRequest.name": _ID,
    "DisableKeyRequest.name": _ID,
    "EnableKeyRequest.name": _ID,
    "DestroyKeyRequest.name": _ID,
    "RotateKeyRequest.partition": Limit(8, "s1sp|dco|admin", note="s1sp, dco or admin"),
    "RotateKeyRequest.key": _ID,
    "DestroyKeyVersionRequest.partition": Limit(8, "s1sp|dco|admin",
                                                note="s1sp, dco or admin"),
    "DestroyKeyVersionRequest.key": _ID,
    "DestroyKeyVersionRequest.version": Limit(low=1, high=999_999),
    "ListKeyVersionsRequest.partition": Limit(8, "|s1sp|dco|admin",
                                              note="s1sp, dco, admin or empty"),
    "EscrowRollbackCertificatesRequest.smso_id": _ID,
    "EscrowRollbackCertificatesRequest.group_id": Limit(
        2, "|".join(GROUP_IDS), note="one of " + ", ".join(GROUP_IDS)),
    "EscrowRollbackCertificatesRequest.chf_identifiers": Limit(1000, item=32,
                                                               note="EUI-64s"),
    "EscrowRollbackCertificatesRequest.certificates": Limit(16, item=_CERT,
                                                            note="DER or PEM"),
    "Date.year": Limit(low=2000, high=2100),
    "Date.month": Limit(low=1, high=12),
    "Date.day": Limit(low=1, high=31),
    "EscrowConstraints.max_releases": Limit(low=0, high=1_000_000),
    "EscrowConstraints.note": _TEXT,
    "ListEscrowsRequest.smso_id": _ID,
    "ListEscrowsRequest.chf_identifier": _EUI,
    "RevokeEscrowRequest.escrow_id": _ID,
    "RevokeEscrowRequest.reason": _REASON,
    "EnrollOfficerRequest.certificate_pem": Limit(_CERT, note="PEM"),
    "EnrollOfficerRequest.display_name": _NAME,
    "RemoveOfficerRequest.display_name": _NAME,
    "DenyCertificateRequest.fingerprint": Limit(95, note="hex (SHA-256 of the SPKI)"),
    "DenyCertificateRequest.reason": Limit(256, r"[ -~]*", note="printable ASCII"),
    "AllowCertificateRequest.fingerprint": Limit(95, note="hex (SHA-256 of the SPKI)"),
    "ListAuditEventsRequest.actor": Limit(64, TEXT, note="as shown in events"),
    "ListAuditEventsRequest.action": Limit(128, r"[A-Za-z0-9._/-]*",
                                           note="letters, digits, `.` `_` `/` `-`"),
    "ListAuditEventsRequest.page_size": Limit(low=0, high=1000),
    "ListAuditEventsRequest.page_token": Limit(18, r"[0-9]*", note="as given out"),
    "ExportAuditEventsRequest.since_sequence": Limit(low=0, high=2**62),
    "ExportAuditEventsRequest.limit": Limit(low=0, high=10_000),
}

_COMPILED = {k: re.compile(v.pattern) for k, v in LIMITS.items() if v.pattern}
_SIZED = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)


def _refuse(key: str, field: str, why: str) -> Exception:
    return error("INVALID_REQUEST", f"{key}: {why}", field=field)


def _one(key: str, fd: FieldDescriptor, limit: Limit, value: Any, size: int) -> None:
    if fd.type in _SIZED:
        if limit.max and len(value) > size:
            raise _refuse(key, fd.name, f"at most {size} "
                          f"{'characters' if fd.type == FieldDescriptor.TYPE_STRING else 'bytes'}")
        pattern = _COMPILED.get(key)
        if pattern and value and not pattern.fullmatch(value):
            raise _refuse(key, fd.name, limit.note or "not in the allowed form")
    elif limit.low is not None and not (limit.low <= value <= limit.high):
        raise _refuse(key, fd.name, f"must be {limit.describe()}")


def check(message: Any) -> None:
    """Refuse the first field of `message` (or of a message inside it) over its limit."""
    name = message.DESCRIPTOR.name
    for fd, value in message.ListFields():
        key = f"{name}.{fd.name}"
        repeated = _is_repeated(fd)
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            for m in (value if repeated else [value]):
                check(m)
            continue
        limit = LIMITS.get(key)
        if limit is None:
            if fd.type == FieldDescriptor.TYPE_ENUM and not repeated:
                continue  # an enum is checked by name where it is used
            raise _refuse(key, fd.name, "this field has no limit (a keysvc bug)")
        if limit.max == 0 and limit.low is None:
            continue  # a migration file: max_file_bytes, then the schema
        if repeated:
            if len(value) > limit.max:
                raise _refuse(key, fd.name, f"at most {limit.max} elements")
            if fd.type in _SIZED:
                for v in value:
                    _one(key, fd, limit, v, limit.item)
        else:
            _one(key, fd, limit, value, limit.max)


def _is_repeated(fd: FieldDescriptor) -> bool:
    return bool(fd.is_repeated)


def _kind(key: str) -> tuple[str, bool]:
    """(unit, repeated) of a field, for the table."""
    from keysvc.api.v1 import keysvc_pb2 as pb
    message, field = key.split(".")
    if message not in pb.DESCRIPTOR.message_types_by_name:
        return "", False
    fd = pb.DESCRIPTOR.message_types_by_name[message].fields_by_name[field]
    unit = {FieldDescriptor.TYPE_STRING: "characters",
            FieldDescriptor.TYPE_BYTES: "bytes"}.get(fd.type, "")
    return unit, _is_repeated(fd)


def table() -> str:
    """The README's table of limits, generated from LIMITS."""
    rows = ["| field | limit |", "|---|---|"]
    for key, limit in LIMITS.items():
        rows.append(f"| `{key}` | {limit.describe(*_kind(key))} |")
    return "\n".join(rows)
