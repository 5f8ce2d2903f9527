"""One exception hierarchy for every request-level failure, mapped to gRPC in one table.

Domain code raises `KeysvcError` subclasses carrying an api.md reason code; the server turns
them into a status plus `google.rpc.ErrorInfo` in `grpc_status_for`. Messages are written
for operators and must never include key bits, plaintext or PINs: constructors take only
safe descriptive text.
"""
from __future__ import annotations

import grpc


class KeysvcError(Exception):
    """Base: `code` is the ErrorInfo reason; `status` the gRPC status code."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL
    code: str = "INTERNAL"

    def __init__(self, message: str = "", *, code: str | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(message or (code or self.code))
        if code is not None:
            self.code = code
        self.message = message or self.code
        self.metadata = dict(metadata or {})


class InvalidArgument(KeysvcError):
    """MALFORMED_XML, FORBIDDEN_XML_CONSTRUCT, FILE_TOO_LARGE, SCHEMA_INVALID, ..."""

    status = grpc.StatusCode.INVALID_ARGUMENT
    code = "INVALID_ARGUMENT"


class FailedPrecondition(KeysvcError):
    """UNKNOWN_TRANSPORT_KEY, KEY_UNWRAP_FAILED, DECRYPTION_FAILED, SAME_OFFICER, ..."""

    status = grpc.StatusCode.FAILED_PRECONDITION
    code = "FAILED_PRECONDITION"


class NotFound(KeysvcError):
    status = grpc.StatusCode.NOT_FOUND
    code = "NOT_FOUND"


class AlreadyExists(KeysvcError):
    status = grpc.StatusCode.ALREADY_EXISTS
    code = "ALREADY_EXISTS"


class PermissionDenied(KeysvcError):
    status = grpc.StatusCode.PERMISSION_DENIED
    code = "ROLE_NOT_PERMITTED"


class Aborted(KeysvcError):
    """A concurrent change won; the call changed nothing and may be retried."""

    status = grpc.StatusCode.ABORTED
    code = "ABORTED"


class ResourceExhausted(KeysvcError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    code = "RESOURCE_EXHAUSTED"


class Unavailable(KeysvcError):
    status = grpc.StatusCode.UNAVAILABLE
    code = "HSM_UNAVAILABLE"


# The api.md error model, as one table: reason -> class. Raising by reason keeps call sites
# short (`raise error("SAME_OFFICER", "...")`) and makes a wrong status impossible.
_REASONS: dict[str, type[KeysvcError]] = {
    **{c: InvalidArgument for c in (
        "MALFORMED_XML", "FORBIDDEN_XML_CONSTRUCT", "FILE_TOO_LARGE", "SCHEMA_INVALID",
        "UNSUPPORTED_ALGORITHM", "PLAINTEXT_ROOT_MISMATCH", "GROUP_ID_MISMATCH",
        "INVALID_EUI64", "INVALID_DATE_RANGE", "INVALID_CERTIFICATE", "INVALID_REQUEST",
        "WEAK_KEY")},
    **{c: FailedPrecondition for c in (
        "UNKNOWN_TRANSPORT_KEY", "TRANSPORT_KEY_DISABLED", "WRONG_KEY_PURPOSE",
        "ORIGINATOR_NOT_PERMITTED", "KEY_UNWRAP_FAILED", "DECRYPTION_FAILED",
        "ESCROW_WINDOW_CLOSED", "ESCROW_EXHAUSTED", "APPROVAL_REQUIRED", "SAME_OFFICER",
        "ESCROW_SEAL_INVALID", "KCV_MISMATCH", "OPERATION_NOT_PENDING",
        "IMPORT_JOB_EXPIRED", "RECORD_SEAL_INVALID", "REQUEST_CHANGED",
        "OFFICERS_BELOW_QUORUM", "KEY_VERSION_DESTROYED", "KEY_VERSION_IN_USE",
        "BACKUP_NOT_POSSIBLE", "TOKEN_NOT_EMPTY", "NOT_ENOUGH_SHARES", "BACKUP_INVALID",
        "SHARE_INVALID", "VERSION_NOT_BACKED_UP", "PARTITION_NOT_SERVED")},
    **{c: NotFound for c in ("DEVICE_KEY_NOT_FOUND", "ESCROW_NOT_FOUND",
                             "OPERATION_NOT_FOUND", "KEY_NOT_FOUND",
                             "IMPORT_JOB_NOT_FOUND", "OFFICER_NOT_FOUND")},
    **{c: AlreadyExists for c in ("FILE_ALREADY_PROCESSED", "KEY_EXISTS", "OFFICER_EXISTS")},
    **{c: PermissionDenied for c in ("ROLE_NOT_PERMITTED", "CERTIFICATE_NOT_ACCEPTED",
                                     "CERTIFICATE_REVOKED", "OFFICER_NOT_ENROLLED")},
    "ROSTER_BUSY": Aborted,
    "KEY_ROTATED": Aborted,
    "HSM_UNAVAILABLE": Unavailable,
    "AUDIT_UNAVAILABLE": Unavailable,
    "DATABASE_UNAVAILABLE": Unavailable,
    "SERVER_STOPPING": Unavailable,
    "IMPORT_JOB_QUOTA": ResourceExhausted,
    "TOO_MANY_STREAMS": ResourceExhausted,
    "TOO_MANY_FILE_CALLS": ResourceExhausted,
    "TOO_MANY_AUDIT_CALLS": ResourceExhausted,
}


def error(code: str, message: str = "", **metadata: str) -> KeysvcError:
    """Build the exception for an api.md reason code."""
    return _REASONS[code](message, code=code, metadata=metadata)


ERROR_DOMAIN = "keysvc"
