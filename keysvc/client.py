"""keysvc's client: `Client` for the programs that call keysvc (typed stubs, typed errors
from ErrorInfo with the request id, default deadlines, retries of idempotent calls), and
`connect` for the CLI, the tests and the benchmarks (an identity from a development state
directory's DIR/pki: s1sp, dco, security-officer-1, ..., exactly as other components would
present theirs).

Importable with `pip install keysvc` alone: nothing here needs the server's dependencies.
"""
from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from keysvc.api.v1 import keysvc_pb2_grpc as rpc

MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def channel(target: str, pki_dir: Path, identity: str | None,
            max_bytes: int = MAX_MESSAGE_BYTES) -> grpc.Channel:
    """A channel with an identity of the development state directory (its server
    certificate is for `localhost`)."""
    ca = (pki_dir / "ca.pem").read_bytes()
    key = cert = None
    if identity:
        key = (pki_dir / f"{identity}.key").read_bytes()
        cert = (pki_dir / f"{identity}.pem").read_bytes()
    return secure_channel(target, ca, cert, key, "localhost", max_bytes)


def secure_channel(target: str, ca: bytes, cert: bytes | None, key: bytes | None,
                   server_name: str = "", max_bytes: int = MAX_MESSAGE_BYTES
                   ) -> grpc.Channel:
    """mTLS to `target`, trusting `ca`; `server_name`: the name the server's certificate
    must carry when it is not the one in `target`."""
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                         certificate_chain=cert)
    options: list[tuple[str, int | str]] = [("grpc.max_receive_message_length", max_bytes),
               ("grpc.max_send_message_length", max_bytes)]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, creds, options=options)


@dataclass
class Stubs:
    channel: grpc.Channel

    @property
    def s1sp(self) -> rpc.S1SPServiceStub:
        return rpc.S1SPServiceStub(self.channel)

    @property
    def dco(self) -> rpc.DCOServiceStub:
        return rpc.DCOServiceStub(self.channel)

    @property
    def admin(self) -> rpc.KeyAdministrationServiceStub:
        return rpc.KeyAdministrationServiceStub(self.channel)

    @property
    def audit(self) -> rpc.AuditServiceStub:
        return rpc.AuditServiceStub(self.channel)


def connect(target: str, state_dir: Path, identity: str | None) -> Stubs:
    return Stubs(channel(target, Path(state_dir) / "pki", identity))


def error_reason(exc: grpc.RpcError) -> str:
    """The ErrorInfo reason of a failed call ("" if it carries none)."""
    status = rpc_status.from_call(exc)
    if status is None:
        return ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


# --------------------------------------------------------------------------- typed client
class KeysvcCallError(Exception):
    """A call keysvc refused: one subclass per api.md reason (`ERRORS`), built from the
    status's ErrorInfo, with the request id (RequestInfo, also in keysvc's log and audit
    trail), the field (BadRequest) and how long to wait (RetryInfo) where given."""

    reason = ""

    def __init__(self, status: grpc.StatusCode, message: str, reason: str = "",
                 request_id: str = "", field: str = "", retry_after: float | None = None
                 ) -> None:
        super().__init__(f"{status.name} {reason}: {message}")
        self.status, self.message = status, message
        self.reason = reason or self.reason
        self.request_id, self.field, self.retry_after = request_id, field, retry_after


def _class_name(reason: str) -> str:
    return "".join(w.capitalize() for w in reason.split("_"))


def _make_errors() -> dict[str, type[KeysvcCallError]]:
    from keysvc.errors import _REASONS
    reasons = sorted({*_REASONS, "INTERNAL"})
    return {r: type(_class_name(r), (KeysvcCallError,), {"reason": r}) for r in reasons}


ERRORS = _make_errors()
globals().update({cls.__name__: cls for cls in ERRORS.values()})


def error_from(exc: grpc.RpcError) -> KeysvcCallError:
    """The typed error of a failed call."""
    reason = request_id = field = ""
    retry_after = None
    status = rpc_status.from_call(exc)
    for d in (status.details if status is not None else []):
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.RequestInfo,
                     error_details_pb2.RetryInfo, error_details_pb2.BadRequest):
            if d.Is(kind.DESCRIPTOR):
                m = kind()
                d.Unpack(m)
                if isinstance(m, error_details_pb2.ErrorInfo):
                    reason = m.reason
                elif isinstance(m, error_details_pb2.RequestInfo):
                    request_id = m.request_id
                elif isinstance(m, error_details_pb2.RetryInfo):
                    retry_after = m.retry_delay.seconds + m.retry_delay.nanos / 1e9
                elif m.field_violations:
                    field = m.field_violations[0].field
    cls = ERRORS.get(reason, KeysvcCallError)
    return cls(exc.code(), exc.details() or "", reason, request_id, field, retry_after)


# Calls that are safe to repeat: gRPC retries them on UNAVAILABLE (the HSM, the database or
# the audit trail briefly away), with backoff, except the migration-file calls (below).
# ProcessGroupInformation and the DCO file calls are idempotent by MigrationFileID; a
# release, an approval or a request never is.
IDEMPOTENT = {
    "keysvc.v1.S1SPService": ["ProcessGroupInformation", "VerifyPrepaymentKey",
                              "VerifyDeviceCertificate", "ExportDeviceKeys"],
    "keysvc.v1.DCOService": ["ValidateMasterKeys", "UnwrapMasterKeys", "VerifyMasterKey"],
    "keysvc.v1.KeyAdministrationService": ["GetOperation", "ListOperations", "ListKeys",
                                           "GetKey", "ListEscrows", "ListOfficers",
                                           "ListKeyVersions"],
    "keysvc.v1.AuditService": ["ListAuditEvents", "VerifyAuditLog", "ExportAuditEvents"],
}
# The migration-file calls are repeated here, not by gRPC: gRPC keeps a call's request for
# a repeat only up to its retry buffer (256 KiB by default; gRPC's retry design, A6), so a
# file of any size was never repeated, and a server with all its file places taken
# answers TOO_MANY_FILE_CALLS (RESOURCE_EXHAUSTED with RetryInfo): wait, and send again,
# within the call's one deadline. A refused attempt has sent part of the file before the
# refusal (12-21 MiB of a 64 MiB file, as HTTP/2's windows grow; review, session 18), so
# the waits double, from the server's RetryInfo to FILE_WAIT_MAX: about a dozen attempts
# in a file call's 300 s, not two hundred.
FILE_METHODS = ("ProcessGroupInformation", "ValidateMasterKeys", "UnwrapMasterKeys")
FILE_UNAVAILABLE_ATTEMPTS = 4  # as the retry policy's maxAttempts
FILE_WAIT_MAX = 30.0
FILE_ATTEMPT_AT_LEAST = 1.0  # seconds left of the deadline for an attempt to be worth it
# Default deadlines: files may be large; everything else is quick.
DEADLINES = {"ProcessGroupInformation": 300.0, "ValidateMasterKeys": 300.0,
             "UnwrapMasterKeys": 300.0, "VerifyAuditLog": 120.0, "ExportAuditEvents": 120.0}
DEFAULT_DEADLINE = 30.0


def service_config() -> str:
    import json
    return json.dumps({"methodConfig": [{
        "name": [{"service": s, "method": m} for s, ms in IDEMPOTENT.items() for m in ms
                 if m not in FILE_METHODS],
        "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.2s", "maxBackoff": "2s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]})


class _Method:
    """One RPC of a stub: called, `with_call` or `future`, with a default deadline, failing
    with a KeysvcCallError subclass."""

    def __init__(self, name: str, method: Any) -> None:
        self._name, self._method = name, method

    def _deadline(self, timeout: float | None) -> float:
        return timeout or DEADLINES.get(self._name, DEFAULT_DEADLINE)

    def __call__(self, request: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        out = self._repeating(self._method, request, timeout, kwargs)
        if hasattr(out, "__next__"):  # a stream fails as it is read
            return _typed_stream(out)
        return out

    def with_call(self, request: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        return self._repeating(self._method.with_call, request, timeout, kwargs)

    def _repeating(self, call: Any, request: Any, timeout: float | None,
                   kwargs: dict) -> Any:
        """The call; a migration-file call again while the server asks for it
        (`_again_after`), until its deadline."""
        deadline = time.monotonic() + self._deadline(timeout)
        refused: dict[bool, int] = {}  # busy (TOO_MANY_FILE_CALLS) or not -> times so far
        while True:
            try:
                return call(request, timeout=max(0.001, deadline - time.monotonic()),
                            **kwargs)
            except grpc.RpcError as exc:
                failed = error_from(exc)
            busy = failed.reason == "TOO_MANY_FILE_CALLS"
            refused[busy] = refused.get(busy, 0) + 1
            wait = self._again_after(failed, refused[busy])
            if wait is None or time.monotonic() + wait + FILE_ATTEMPT_AT_LEAST >= deadline:
                raise failed
            time.sleep(wait)

    def _again_after(self, failed: KeysvcCallError, times: int) -> float | None:
        """Seconds to wait before a file call's next attempt, after its `times`-th refusal of
        this kind, or None: none. TOO_MANY_FILE_CALLS whenever it comes (a place frees as
        another file's call ends), at least the server's RetryInfo, doubling; UNAVAILABLE
        up to FILE_UNAVAILABLE_ATTEMPTS in all, after the server's RetryInfo, else the retry
        policy's backoff. With jitter, so that callers refused together do not return
        together."""
        if self._name not in FILE_METHODS:
            return None
        asked = max(0.0, failed.retry_after or 0.0)  # (a server's word, never negative)
        if failed.reason == "TOO_MANY_FILE_CALLS":
            base = max(asked or 1.0, min(FILE_WAIT_MAX, 2.0 ** (times - 1)))
        elif failed.status is grpc.StatusCode.UNAVAILABLE and \
                times < FILE_UNAVAILABLE_ATTEMPTS:
            base = asked or min(2.0, 0.2 * 2 ** (times - 1))
        else:
            return None
        return base * random.uniform(1.0, 1.5)

    def future(self, request: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """The stub's future, with the default deadline; its result() raises the typed
        errors too. (Made once: a file call's future is not repeated, as a call is.)"""
        return _Future(self._method.future(request, timeout=self._deadline(timeout),
                                           **kwargs))


class _Future:
    """A call's future whose result() raises a KeysvcCallError subclass."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def result(self, timeout: float | None = None) -> Any:
        try:
            return self._inner.result(timeout)
        except grpc.RpcError as exc:
            raise error_from(exc) from None

    def __getattr__(self, name: str) -> Any:  # cancel, done, add_done_callback, ...
        return getattr(self._inner, name)


class _Typed:
    """A stub whose methods are `_Method`s. It stands in for the generated stub class (the
    Client's properties say so), so a caller's type checker sees each RPC's request and
    response types (mypy-protobuf's stubs, built with the package)."""

    def __init__(self, stub: object) -> None:
        self._stub = stub

    def __getattr__(self, name: str) -> _Method:
        return _Method(name, getattr(self._stub, name))


def _typed_stream(stream: Any) -> Iterator[Any]:
    try:
        yield from stream
    except grpc.RpcError as exc:
        raise error_from(exc) from None


@dataclass
class Client:
    """keysvc for other components: mTLS from PEM files or bytes, the server name to check
    configurable, retries of idempotent calls, default deadlines, typed errors.

        client = Client.from_files("keysvc.internal:50051", ca="ca.pem", cert="s1sp.pem",
                                   key="s1sp.key")
        client.s1sp.VerifyPrepaymentKey(pb.VerifyPrepaymentKeyRequest(...))
    """
    channel: grpc.Channel

    @classmethod
    def from_pem(cls, target: str, *, ca: bytes, cert: bytes, key: bytes,
                 server_name: str = "", max_bytes: int = MAX_MESSAGE_BYTES) -> "Client":
        """`max_bytes`: the largest message either way (a 64 MiB file goes up, and the
        result of a file of 30,000 installations, some 10 MB, comes back: gRPC's own
        limit for what it receives is 4 MiB)."""
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                             certificate_chain=cert)
        options: list[tuple[str, int | str]] = [
            ("grpc.enable_retries", 1), ("grpc.service_config", service_config()),
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        return cls(grpc.secure_channel(target, creds, options=options))

    @classmethod
    def for_identity(cls, target: str, state_dir: str | Path, identity: str) -> "Client":
        """An identity of a development state directory (DIR/pki/NAME.pem, .key; its
        server certificate names `localhost`)."""
        pki = Path(state_dir) / "pki"
        return cls.from_pem(target, ca=(pki / "ca.pem").read_bytes(),
                            cert=(pki / f"{identity}.pem").read_bytes(),
                            key=(pki / f"{identity}.key").read_bytes(), server_name="localhost")

    @classmethod
    def from_files(cls, target: str, *, ca: str | Path, cert: str | Path, key: str | Path,
                   server_name: str = "") -> "Client":
        return cls.from_pem(target, ca=Path(ca).read_bytes(), cert=Path(cert).read_bytes(),
                            key=Path(key).read_bytes(), server_name=server_name)

    @property
    def s1sp(self) -> rpc.S1SPServiceStub:
        return cast(rpc.S1SPServiceStub, _Typed(rpc.S1SPServiceStub(self.channel)))

    @property
    def dco(self) -> rpc.DCOServiceStub:
        return cast(rpc.DCOServiceStub, _Typed(rpc.DCOServiceStub(self.channel)))

    @property
    def admin(self) -> rpc.KeyAdministrationServiceStub:
        return cast(rpc.KeyAdministrationServiceStub,
                    _Typed(rpc.KeyAdministrationServiceStub(self.channel)))

    @property
    def audit(self) -> rpc.AuditServiceStub:
        return cast(rpc.AuditServiceStub, _Typed(rpc.AuditServiceStub(self.channel)))

    def close(self) -> None:
        self.channel.close()
