"""The gRPC server: mTLS, one interceptor for roles, audit, errors and metrics; health.

The interceptor is the only place that knows about callers and status codes: it reads the
role from the verified client certificate, refuses roles the service does not list, turns
`KeysvcError`/`HsmError` into a status with google.rpc.ErrorInfo (one table, in errors.py),
and appends one audit event per call, allowed or denied.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import gc
import hashlib
import logging
import os
import re
import signal
import threading
import time
import uuid
from concurrent import futures
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, NoReturn, cast

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status
from sqlalchemy.exc import SQLAlchemyError

from keysvc import limits, notify, processes, tracing
from keysvc import store as st
from keysvc.api.v1 import keysvc_pb2
from keysvc.app import App, Caller
from keysvc.audit.writer import at_work
from keysvc.errors import ERROR_DOMAIN, KeysvcError, error
from keysvc.hsm import HsmError, HsmUnavailable
from keysvc.identity.admission import admit, client_cas
from keysvc.identity.certificates import caller_from_pem
from keysvc.observability import HSM_IDLE, HSM_IN_USE, HSM_UP, LATENCY, REQUESTS, request_id

log = logging.getLogger("keysvc.server")

SERVICE_ROLES: dict[str, frozenset[str]] = {
    "keysvc.v1.S1SPService": frozenset({"s1sp"}),
    "keysvc.v1.DCOService": frozenset({"dco"}),
    "keysvc.v1.KeyAdministrationService": frozenset({"security-officer"}),
    "keysvc.v1.AuditService": frozenset({"auditor", "security-officer"}),
}
# Served to any authenticated caller and not audited: load balancers poll them constantly.
UNAUDITED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                      "grpc.reflection.v1.ServerReflection")

# Refusals of the caller itself (audited as DENIED, not ERROR).
DENIALS = ("ROLE_NOT_PERMITTED", "CERTIFICATE_NOT_ACCEPTED", "CERTIFICATE_REVOKED",
           "OFFICER_NOT_ENROLLED")

HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
# Streams that stay open for as long as their client likes: how many of each a process
# holds at once, and how many of them one client certificate (a fleet of balancers may
# share one; reflection is a person with grpcurl).
HEALTH_WATCH_STREAMS, HEALTH_WATCH_STREAMS_A_CLIENT = 64, 16
REFLECTION_STREAMS, REFLECTION_STREAMS_A_CLIENT = 8, 2


def _client_key(context: Any) -> bytes:
    """The client certificate a limit counts by: SHA-256 of its PEM, unparsed (cheap on
    the event loop; mTLS has verified it)."""
    pems = (context.auth_context() or {}).get("x509_pem_cert") or [b""]
    return hashlib.sha256(pems[0]).digest()


class LongStreams:
    """Streams that stay open as long as their client likes (health's Watch, reflection): at
    most `limit` are open at once, and one more is refused RESOURCE_EXHAUSTED
    TOO_MANY_STREAMS, and at most `a_client` of them from one client certificate, so that
    no certificate holds them all and shuts out the others' (review, session 16). On the
    event loop an open stream holds no thread (on the synchronous server each held one, and
    16 of them stopped every call of a worker: the same review). At a stop every stream
    still open is ended (`end`): the drain waits for no client that is only listening."""

    def __init__(self, kind: str, limit: int, a_client: int) -> None:
        self.kind, self.limit, self.a_client = kind, limit, a_client
        self._open: collections.Counter[bytes] = collections.Counter()  # (on the loop only)
        self.ending = asyncio.Event()  # set at a stop: a stream that waits for its client ends

    @contextlib.asynccontextmanager
    async def held(self, context: Any) -> AsyncIterator[None]:
        """One stream open for as long as the block runs (in the stream's task)."""
        client = _client_key(context)
        if self._open[client] >= self.a_client:
            failure = error("TOO_MANY_STREAMS", f"at most {self.a_client} {self.kind} streams "
                                                f"are open at once from one certificate")
            await context.abort_with_status(rpc_status.to_status(status_for(failure)))
        if self._open.total() >= self.limit:
            failure = error("TOO_MANY_STREAMS", f"at most {self.limit} {self.kind} streams "
                                                f"are open at once")
            await context.abort_with_status(rpc_status.to_status(status_for(failure)))
        self._open[client] += 1
        try:
            yield
        finally:
            self._open[client] -= 1
            if not self._open[client]:
                del self._open[client]

    def end(self) -> None:
        """At a stop, on the loop: every stream that waits for its client's next message
        ends (`until_ending`), so that the drain does not wait its grace for an idle
        grpcurl. (Cancelling the stream's task did not end it: gRPC then sends no status.)"""
        self.ending.set()

    def until_ending(self, messages: Any) -> AsyncIterator[Any]:
        """The client's messages, until it half-closes or the server stops."""
        return _until(self.ending, messages)


async def _until(stop: asyncio.Event, messages: Any) -> AsyncIterator[Any]:
    """A call's messages, until its client half-closes or `stop` is set."""
    incoming = messages.__aiter__()
    ending = asyncio.ensure_future(stop.wait())
    message: asyncio.Future | None = None
    try:
        while True:
            message = asyncio.ensure_future(incoming.__anext__())
            await asyncio.wait({message, ending}, return_when=asyncio.FIRST_COMPLETED)
            if not message.done():
                return
            try:
                item = message.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        ending.cancel()
        if message is not None and not message.done():
            message.cancel()  # (the stream ends, or its client went)
        elif message is not None and not message.cancelled():
            message.exception()  # (read: an end of stream no one awaited is not an error)


class HealthNow:
    """The process's health as Watch streams it: set by HealthWatch (a thread) when it
    changes, NOT_SERVING for good once the server stops. keysvc's own Watch, not the health
    servicer's: that one keeps a stream cancelled before its close callback was added, for
    good (a review made 153 of 1,500 quickly cancelled Watches stay), and under grpc.aio
    its synchronous Watch held a thread that no cancel freed (review, session 16)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.status = health_pb2.HealthCheckResponse.NOT_SERVING  # (until the first check)
        self.stopping = False
        self._changed = asyncio.Event()  # replaced at each change; the old one is set

    def set(self, status: int) -> None:
        """From any thread."""
        try:
            self.loop.call_soon_threadsafe(self._set, status, False)
        except RuntimeError:  # (the loop closed: the server has stopped)
            pass

    def stop(self) -> None:
        """On the loop: NOT_SERVING, the last item of every Watch."""
        self._set(health_pb2.HealthCheckResponse.NOT_SERVING, True)

    def _set(self, status: int, stopping: bool) -> None:
        if self.stopping:
            return
        self.status, self.stopping = status, stopping
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def watch(self) -> AsyncIterator[Any]:
        """The status now, then each change, until the client goes (gRPC cancels the
        stream's task) or the server stops (whose NOT_SERVING is the last item)."""
        sent = None
        while True:
            changed = self._changed
            if self.status != sent or self.stopping:
                sent, last = self.status, self.stopping
                yield health_pb2.HealthCheckResponse(status=sent)
                if last:
                    return
                continue
            await changed.wait()


def _health_watch(app: App, handler: Any, streams: LongStreams, now: HealthNow) -> Any:
    """Watch a service this process reports, or the server (""): any other name is
    answered SERVICE_UNKNOWN at once (and nothing is kept for it)."""

    async def watch(request: Any, context: Any) -> Any:
        refused = _refused_request(request)
        if refused is not None:
            await context.abort_with_status(rpc_status.to_status(status_for(refused)))
        if request.service not in ("", *served_services(app)):
            yield health_pb2.HealthCheckResponse(
                status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            return
        async with streams.held(context):
            async for item in now.watch():
                yield item
    return grpc.unary_stream_rpc_method_handler(
        watch, request_deserializer=_bounded(handler.request_deserializer),
        response_serializer=handler.response_serializer)


def _health_check(handler: Any) -> Any:
    """The health servicer's Check (synchronous: in gRPC's own pool), its request bounded."""
    inner = handler.unary_unary

    def check(request: Any, context: Any) -> Any:
        refused = _refused_request(request)
        if refused is not None:  # (gRPC's synchronous context under aio: no abort_with_status)
            status = rpc_status.to_status(status_for(refused))
            context.abort(status.code, status.details, status.trailing_metadata)
        return inner(request, context)
    return grpc.unary_unary_rpc_method_handler(
        check, request_deserializer=_bounded(handler.request_deserializer),
        response_serializer=handler.response_serializer)


REFLECTION_SERVICES = ("grpc.reflection.v1alpha.ServerReflection",
                       "grpc.reflection.v1.ServerReflection")


def _reflection_needs_a_role(app: App, handler: Any, streams: LongStreams,
                             pool: futures.Executor) -> Any:
    """Reflection (a stream) lists every service: only to a certificate that is accepted,
    names a role and is admitted (not revoked; an officer enrolled). Not audited, like
    health: tools poll it. The caller's checks read the database: in `pool`, never on the
    event loop, which a stalled database would stop for every call."""
    inner = handler.stream_stream

    async def wrapped(requests: Any, context: Any) -> Any:
        loop = asyncio.get_running_loop()
        caller = await loop.run_in_executor(pool, _caller, app, _Seen(context)) \
            or Caller("", "", "", "no client certificate")
        if caller.refusal or not caller.role:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                caller.refusal or "reflection needs a role")
        try:  # before the stream takes one of the few reflection streams
            await loop.run_in_executor(pool, admit, app, caller)
        except KeysvcError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, exc.message)

        async def admitted() -> Any:
            """Each message of the stream is admitted anew: a stream opened before its key
            was denied stops at the next request."""
            async for r in streams.until_ending(requests):
                refused = _refused_request(r)
                if refused is not None:
                    await context.abort_with_status(rpc_status.to_status(status_for(refused)))
                try:
                    await loop.run_in_executor(pool, admit, app, caller)
                except KeysvcError as exc:
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, exc.message)
                yield r
        async with streams.held(context):
            async for response in inner(admitted(), context):
                yield response
    return grpc.stream_stream_rpc_method_handler(
        wrapped, request_deserializer=_bounded(handler.request_deserializer),
        response_serializer=handler.response_serializer)


UNDECODABLE = object()  # a request that is not valid protobuf (or UTF-8)
OVERSIZED = object()    # a request of health or reflection over REQUEST_BYTES_UNAUDITED

# A health or reflection request is a few bytes: parsed on the event loop, anything larger
# is refused unparsed (INVALID_REQUEST).
REQUEST_BYTES_UNAUDITED = 4096


@dataclass(frozen=True)
class FileRequest:
    """A migration-file request reduced to its file. gRPC drops its own bytes once the
    deserializer returns, and the message goes here too: a 64 MiB file is then held once
    instead of three times (gRPC's bytes, the message, the copy each read of a bytes field
    makes). The size cap is `max_file_bytes`; the file has no other field to bound."""

    file: bytes


class Undecoded:
    """A request as gRPC received it. gRPC runs a deserializer on the event loop, before
    the role check: parsing 120 MiB of unknown fields there (0.9 s) stopped every call of
    the process, from any client certificate (review, session 17). So an audited call's
    request is decoded in the calls' pool, after the role check (`_decode`)."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def take(self) -> bytes:
        raw, self.raw = self.raw, b""  # (held once: by the caller of take)
        return raw


def _decode(decode: Callable[[bytes], Any], request: Undecoded, max_file_bytes: int) -> Any:
    """The message, or INVALID_REQUEST: one that does not decode (protobuf or UTF-8), or,
    for a method that takes no migration file, one over `limits.REQUEST_BYTES` (checked
    before parsing). A migration-file request becomes a FileRequest (`_file_request`)."""
    raw = request.take()
    if _takes_a_file(decode):
        return _file_request(raw, max_file_bytes)
    if len(raw) > limits.REQUEST_BYTES:
        raise error("INVALID_REQUEST", f"the request is {len(raw)} bytes; one without a "
                                       f"migration file is at most {limits.REQUEST_BYTES}")
    try:
        return decode(raw)
    except Exception:
        raise error("INVALID_REQUEST", "the request does not decode (protobuf or UTF-8)")


def _not_read(why: Exception) -> Callable[[Any, Any], Any]:
    """The handler of a file or trail call refused before it took a place (its file not
    read), for when `_work` admits the caller after all: the HSM or database failure that
    refused it then (mapped by `_work`: HSM_UNAVAILABLE, DATABASE_UNAVAILABLE), or
    ROSTER_BUSY when the roster changed between the two looks. Retried, it is served."""
    def refuse(_request: Any, _context: Any) -> Any:
        if isinstance(why, KeysvcError):
            raise error("ROSTER_BUSY", "the caller's standing changed as the call began; "
                                       "retry")
        raise why
    return refuse


# Migration-file calls a process takes in at once, of a partition and from one certificate
# (each holds up to 129 MiB of request and its working memory; the synchronous server's
# 16 threads bounded them, the event loop does not: 8 a partition is its bound for both),
# and how long a file may take to come (keysvc.client's deadline for a file call: a slow
# link's upload is served). One certificate may send the same file on eight connections at
# once (tests/test_s1sp_server.py).
FILE_CALLS, FILE_CALLS_A_CLIENT, FILE_ARRIVAL_SECONDS = 8, 8, 300.0
# The audit trail's calls (VerifyAuditLog reads the whole chain, about 170 us an event: three
# minutes at a million) work in threads of their own: four of them, from one auditor's
# certificate, held every thread of the small calls' pool, and the S1SP's and the DCO's
# calls waited for them (review, session 18). They wait for each other instead, at most
# two of a certificate at once (TOO_MANY_AUDIT_CALLS): six verifications whose client had
# gone made another auditor's one-event listing wait 15 s (review 2, session 18).
TRAIL_SERVICE, TRAIL_THREADS = "keysvc.v1.AuditService", 3
TRAIL_CALLS, TRAIL_CALLS_A_CLIENT = 16, 2  # (fewer a certificate than threads: another's
#                                            call always finds one)


class Place:
    """One call's place (`Places.take`), released once."""

    def __init__(self, places: "Places", key: tuple[str, bytes]) -> None:
        self._places, self._key, self._held = places, key, True

    def release(self) -> None:
        if self._held:
            self._held = False
            for k in (self._key, self._key[0]):
                self._places.counts[k] -= 1
                if not self._places.counts[k]:
                    del self._places.counts[k]


class Places:
    """How many calls of a kind (migration-file calls, of each partition; the audit
    trail's) there are at once, and from each certificate: a call over either limit is
    refused at once (one that waited could leak its place to a cancel, and a client of the
    role that never sent its file held every waiting call: review, session 17). On the
    loop only: no lock."""

    def __init__(self, limit: int = FILE_CALLS, a_client: int = FILE_CALLS_A_CLIENT) -> None:
        self.counts: collections.Counter[Any] = collections.Counter()
        self.limit, self.a_client = limit, a_client

    def take(self, kind: str, context: Any) -> Place | None:
        """A place for a call of `kind` (a partition's files, the trail), or None."""
        key = (kind, _client_key(context))
        if self.counts[key] >= self.a_client or self.counts[kind] >= self.limit:
            return None
        self.counts[key] += 1
        self.counts[kind] += 1
        return Place(self, key)


async def _refuse(context: Any, failure: KeysvcError) -> NoReturn:
    """End a call that is not run (nothing to audit) with `failure`'s status."""
    await context.abort_with_status(rpc_status.to_status(status_for(failure)))
    raise AssertionError("abort returned")  # (it raises: gRPC ends the call)


def _takes_a_file(decode: Callable[[bytes], Any]) -> bool:
    """A migration-file request: one `file` field, and nothing else (the generated
    `FromString` is bound to its message class)."""
    message_type = getattr(decode, "__self__", None)
    return message_type is not None and \
        [f.name for f in message_type.DESCRIPTOR.fields] == ["file"]


def _file_request(raw: bytes, max_file_bytes: int) -> FileRequest:
    """A migration-file request read by hand: its one field (1, bytes: tag 0x0a, a length,
    the file) and nothing else. protobuf's parser holds the GIL for the whole message, and
    120 MiB of small unknown fields beside a file stopped every call of the process for a
    second (review, session 17); a slice is also one copy of the file fewer."""
    if len(raw) > max_file_bytes + 16:
        raise error("FILE_TOO_LARGE", f"the request is {len(raw)} bytes; the limit of its "
                                      f"file is {max_file_bytes}")
    if not raw:
        return FileRequest(b"")
    length, shift, at = 0, 0, 1
    while raw[0] == 0x0A and at < min(len(raw), 11):
        byte = raw[at]
        at, length, shift = at + 1, length | (byte & 0x7F) << shift, shift + 7
        if not byte & 0x80:
            if at + length == len(raw):
                return FileRequest(raw[at:])
            break
    raise error("INVALID_REQUEST", "a migration-file request holds its file (field 1) and "
                                   "nothing else")


def _bounded(decode: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A health or reflection deserializer (on the event loop): OVERSIZED past
    REQUEST_BYTES_UNAUDITED, unparsed; UNDECODABLE where it does not decode."""
    if decode is None:
        return None

    def deserialize(raw: bytes) -> Any:
        if len(raw) > REQUEST_BYTES_UNAUDITED:
            return OVERSIZED
        try:
            return decode(raw)
        except Exception:
            return UNDECODABLE
    return deserialize


def _refused_request(request: Any) -> KeysvcError | None:
    """INVALID_REQUEST for a health or reflection request `_bounded` refused."""
    if request is OVERSIZED:
        return error("INVALID_REQUEST", f"a health or reflection request is at most "
                                        f"{REQUEST_BYTES_UNAUDITED} bytes")
    if request is UNDECODABLE:
        return error("INVALID_REQUEST", "the request does not decode (protobuf or UTF-8)")
    return None


# What the servicer names as the call's target, for its audit event.
audit_target: contextvars.ContextVar[str] = contextvars.ContextVar("audit_target", default="")
current_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("current_caller")


def _caller(app: App, context: Any) -> Caller | None:
    # gRPC's auth context: property name -> list of values (bytes)
    pems = cast("list[bytes]", (context.auth_context() or {}).get("x509_pem_cert") or [])
    if not pems:
        return None
    return caller_from_pem(pems[0], client_cas(app))


# An error travels in the response trailers: one that quotes a megabyte of the caller's
# input would not arrive at all ("Stream removed", no ErrorInfo). Messages and metadata
# values are cut to a length that always does.
MAX_MESSAGE = 400
MAX_METADATA = 128


# No error quotes more than 64 characters of the caller's input: every quoted value in a
# message ('...' or "...", escapes included) and every unbroken run of characters is cut to
# that, whichever code wrote it.
QUOTED_INPUT = 64
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'" + r'|"(?:[^"\\]|\\.)*"')
_RUN = re.compile(r"\S{%d,}" % (QUOTED_INPUT + 1))


def _shorten(m: re.Match) -> str:
    text = m[0]
    if len(text) <= QUOTED_INPUT + 2:
        return text
    if text[0] in "'\"":
        return text[:QUOTED_INPUT + 1] + "..." + text[0]
    return text[:QUOTED_INPUT] + "..."


def _cut(text: str, limit: int) -> str:
    text = _RUN.sub(_shorten, _QUOTED.sub(_shorten, text))
    return text if len(text) <= limit else text[:limit - 3] + "..."


# How long a caller should wait before trying again a call that failed UNAVAILABLE (the HSM,
# the database or the audit trail is down), or TOO_MANY_FILE_CALLS / TOO_MANY_AUDIT_CALLS
# (a place comes back as such a call ends): google.rpc.RetryInfo.
RETRY_AFTER_SECONDS = 1
RETRY_LATER = ("TOO_MANY_FILE_CALLS", "TOO_MANY_AUDIT_CALLS")


def status_for(exc: KeysvcError) -> status_pb2.Status:
    """The status of a refused call, with details a caller can act on: ErrorInfo (the
    reason, one table in errors.py), RequestInfo (the request id, also in the log line and
    the audit trail's time), RetryInfo on UNAVAILABLE, and BadRequest naming the field of
    an INVALID_REQUEST."""
    metadata = {_cut(k, 64): _cut(str(v), MAX_METADATA) for k, v in exc.metadata.items()}
    details = [error_details_pb2.ErrorInfo(reason=exc.code, domain=ERROR_DOMAIN,
                                           metadata=metadata),
               error_details_pb2.RequestInfo(request_id=request_id.get())]
    if exc.status == grpc.StatusCode.UNAVAILABLE or exc.code in RETRY_LATER:
        info = error_details_pb2.RetryInfo()
        info.retry_delay.seconds = RETRY_AFTER_SECONDS
        details.append(info)
    if exc.code in ("INVALID_REQUEST", "SCHEMA_INVALID") and metadata.get("field"):
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=metadata["field"], description=_cut(exc.message, MAX_MESSAGE))]))
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    return status_pb2.Status(code=exc.status.value[0], message=_cut(exc.message, MAX_MESSAGE),
                             details=packed)


# The services of one partition: in a process that does not serve it (serve --partitions)
# their calls are answered FAILED_PRECONDITION PARTITION_NOT_SERVED, audited like any call.
PARTITION_SERVICES = {"keysvc.v1.S1SPService": "s1sp", "keysvc.v1.DCOService": "dco"}


def _service_of(method: str) -> str:
    """"keysvc.v1.S1SPService" of "/keysvc.v1.S1SPService/VerifyPrepaymentKey"; "" of a
    path that names no method (any client may send one: UNIMPLEMENTED, never a crash)."""
    parts = method.split("/")
    return parts[1] if len(parts) > 2 else ""


def _partition_of(method: str) -> str | None:
    parts = method.split("/")
    return PARTITION_SERVICES.get(parts[1]) if len(parts) > 2 else None


def _exists(method: str) -> bool:
    """A method of keysvc's API (an unknown one is UNIMPLEMENTED, and no audit action)."""
    _, service, name = method.split("/", 2)
    found = keysvc_pb2.DESCRIPTOR.services_by_name.get(service.rsplit(".", 1)[-1])
    return found is not None and name in found.methods_by_name


def served_services(app: App) -> list[str]:
    """The keysvc services this process registers (and reports in health)."""
    return [s for s in SERVICE_ROLES
            if PARTITION_SERVICES.get(s) in (None, *app.partitions.tokens)]


class _Seen:
    """What the synchronous part of a call reads from gRPC's context, read on the event loop
    (the aio context belongs to it) and handed to the thread that does the work."""

    def __init__(self, context: Any) -> None:
        self._auth = context.auth_context()
        self._metadata = context.invocation_metadata()

    def auth_context(self) -> Any:
        return self._auth

    def invocation_metadata(self) -> Any:
        return self._metadata


@dataclass
class _Done:
    """A call's work done (in a thread), its audit event still to be kept (on the loop)."""
    caller: Caller
    call: Any
    started: float
    current: Any
    spans: contextlib.ExitStack
    response: Any = None
    failure: KeysvcError | None = None
    code: str = "OK"
    outcome: str = "OK"


class KeysvcInterceptor(grpc.aio.ServerInterceptor):
    """Every keysvc call in three steps (issue 18): its work in a thread of `pool`, its
    audit event awaited on the event loop, its answer. A call waiting for its event holds
    no thread: with the synchronous server each waiting call held one of the pool's, and
    those threads handing the GIL, the HSM lock and the connection pool to each other cost
    a worker about 33 context switches a call (bench/bench_cores.py)."""

    def __init__(self, app: App, pool: futures.ThreadPoolExecutor, watches: LongStreams,
                 reflections: LongStreams, now: HealthNow) -> None:
        self.app, self.pool = app, pool
        # Migration files' work in threads of their own, one for each place
        # (`Places`): a file holds its thread for seconds to minutes, and the small
        # calls' pool stays small (`Settings.workers`).
        self.file_pool = futures.ThreadPoolExecutor(
            max_workers=FILE_CALLS * len(PARTITION_SERVICES), thread_name_prefix="file")
        self.trail_pool = futures.ThreadPoolExecutor(max_workers=TRAIL_THREADS,
                                                     thread_name_prefix="trail")
        self.watches, self.reflections, self.now = watches, reflections, now
        self._calls: set[asyncio.Task] = set()  # calls not ended yet (on the loop)
        self._answering: set[asyncio.Task] = set()  # gRPC's tasks of calls not answered yet
        self.closing = False  # set once a stop is quiet: a long call that comes is refused
        self.started_at = 0.0  # when the loop last started a call (`quiet`)
        self.stopping = asyncio.Event()  # set late in a stop: no file is read after it
        self.files = Places()
        self.trail = Places(TRAIL_CALLS, TRAIL_CALLS_A_CLIENT)

    async def drain(self, timeout: float) -> int:
        """After the server stopped: the calls it no longer waits for (their client went,
        or the grace ended) finish their work, event and log line. At a stop they once
        lost both (review, session 16). Returns how many are still at work."""
        if self._calls:
            await asyncio.wait(set(self._calls), timeout=timeout)
        return len(self._calls)

    async def _enter(self, context: Any, long: bool = False) -> None:
        """A keysvc call's first step: counted until gRPC has its answer (`settle`). A
        `long` one (a migration file, the audit trail's) is refused SERVER_STOPPING
        (UNAVAILABLE, a client repeats it) once a stop is quiet: started then, it could be
        cut off at the grace, its work done and its answer lost (review 1, session 19).
        The other calls are served as before the stop: they take milliseconds, and a
        client whose connection stays with this replica (an L4 balancer) would have every
        one refused while the stop waits (review 2)."""
        if self.closing and long:
            await _refuse(context, error("SERVER_STOPPING", "the server is stopping; retry"))
        task = asyncio.current_task()
        if task is not None:
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)

    async def settle(self, timeout: float) -> None:
        """At a stop, before the server's: the calls being answered now (a file still on
        its way too) end, at most `timeout`, while their connections are still open.
        gRPC closes a connection it has sent GOAWAY the moment its last call ends, with
        the client's last frames unread: the kernel then resets it and drops what the
        client had not yet received, so a large answer (a migration file's, 1 MiB) was
        lost to a client slow to read it (UNAVAILABLE "Connection reset by peer"; CI,
        session 19). Calls whose client went are not waited for here (`drain`)."""
        self.closing = True
        answering = self._answering - {asyncio.current_task()}
        if answering:
            await asyncio.wait(answering, timeout=timeout)

    async def quiet(self, *, still: float = 0.25, longest: float = 5.0) -> None:
        """At a stop, before the server's: serve (NOT_SERVING) until no call has started for
        `still` seconds, at most `longest`. Calls gRPC had taken that the loop had not
        started yet were answered CANCELLED by the stop, unaudited and not retried (124 of
        150 in a review's burst, session 17); a balancer needs a moment to see
        NOT_SERVING."""
        end = time.monotonic() + longest
        while time.monotonic() < end and time.monotonic() - self.started_at < still:
            await asyncio.sleep(0.05)

    def _not_served(self, method: str) -> Any:
        """A call to the other organisation's service: the role check and the audit event
        as for any call, then PARTITION_NOT_SERVED (its request is never decoded)."""
        service, partition = method.split("/")[1], _partition_of(method)

        def refuse(_request: Any, _context: Any) -> Any:
            raise error("PARTITION_NOT_SERVED", f"this process does not serve the {partition} "
                                                f"partition (serve --partitions)")

        async def wrapped(request: Any, context: Any) -> Any:
            await self._enter(context)
            return await self._call(service, method, refuse, request, context)
        return grpc.unary_unary_rpc_method_handler(
            wrapped, request_deserializer=lambda raw: raw,
            response_serializer=lambda message: b"")

    async def intercept_service(self, continuation: Callable,
                                details: grpc.HandlerCallDetails) -> Any:
        if _service_of(details.method) in SERVICE_ROLES:  # (health, reflection: not calls)
            self.started_at = time.monotonic()
        handler = await continuation(details)
        if handler is not None and details.method == HEALTH_WATCH:
            # Not audited (as Check); keysvc's own, on the loop (HealthNow).
            return _health_watch(self.app, handler, self.watches, self.now)
        if handler is not None and handler.stream_stream is not None \
                and _service_of(details.method) in REFLECTION_SERVICES:
            return _reflection_needs_a_role(self.app, handler, self.reflections, self.pool)
        if handler is None and _partition_of(details.method) not in (
                None, *self.app.partitions.tokens) and _exists(details.method):
            return self._not_served(details.method)
        if handler is None or (handler.unary_unary is None and handler.unary_stream is None):
            return handler
        method = details.method  # "/keysvc.v1.S1SPService/ProcessGroupInformation"
        service = method.split("/")[1]
        if service in UNAUDITED_SERVICES:  # health's Check: synchronous, in gRPC's own pool
            return _health_check(handler)
        streams = handler.unary_unary is None
        # A stream's items are gathered before the first is sent, so that the call is
        # audited (fail closed) before anything leaves (ExportAuditEvents: bounded by limit).
        inner = (lambda r, c: list(handler.unary_stream(r, c))) if streams \
            else handler.unary_unary
        decode = handler.request_deserializer

        def decoded(request: Undecoded, context: Any) -> Any:
            """Runs after the role check, in the calls' pool: an undecodable request is
            INVALID_REQUEST (and audited), never gRPC's INTERNAL, and a caller of the wrong
            role learns nothing from it."""
            message = _decode(decode, request, self.app.settings.max_file_bytes)
            if not isinstance(message, FileRequest):
                limits.check(message)  # every field bounded (keysvc/limits.py)
            return inner(message, context)

        async def wrapped(request: Any, context: Any) -> Any:
            await self._enter(context, long=service == TRAIL_SERVICE)
            return await self._call(service, method, decoded, request, context)

        async def wrapped_stream(request: Any, context: Any) -> Any:
            await self._enter(context, long=service == TRAIL_SERVICE)
            for item in await self._call(service, method, decoded, request, context):
                yield item

        async def wrapped_file(requests: Any, context: Any) -> Any:
            """A migration-file call, read as a stream of its one message: gRPC keeps a
            unary call's request bytes until the call ends, one more copy of a 64 MiB file
            (the DCO's peak 543 MiB against 479 with the synchronous server; session 17).
            Read from the stream, the bytes are the call's alone. The wire is the same: the
            caller's stub is unary, and a message after the first is not read."""
            await self._enter(context, long=True)
            why_not = await asyncio.get_running_loop().run_in_executor(
                self.pool, self._may_call, service, _Seen(context))
            if why_not is not None:
                # Refused (and audited) in `_work` without its file ever read: four 120 MiB
                # files from a caller of the wrong role took a server to 1 GB (review).
                return await self._call(service, method, _not_read(why_not),
                                        Undecoded(b""), context)
            place = self.files.take(PARTITION_SERVICES[service], context)
            if place is None:
                await _refuse(context, error(
                    "TOO_MANY_FILE_CALLS", f"at most {FILE_CALLS_A_CLIENT} migration-file "
                    f"calls from one certificate, and {FILE_CALLS} of a partition, at once"))
            request = None
            try:
                async with asyncio.timeout(FILE_ARRIVAL_SECONDS):
                    async for request in _until(self.stopping, requests):
                        break
            except TimeoutError:
                place.release()
                await _refuse(context, error(
                    "INVALID_REQUEST", f"the file did not come within {FILE_ARRIVAL_SECONDS:g} s"))
            except BaseException:  # (its client went)
                place.release()
                raise
            return await self._received(service, method, decoded, request, context, place)

        if _takes_a_file(decode):
            return grpc.stream_unary_rpc_method_handler(
                wrapped_file, request_deserializer=Undecoded,
                response_serializer=handler.response_serializer)
        if streams:
            return grpc.unary_stream_rpc_method_handler(
                wrapped_stream, request_deserializer=Undecoded,
                response_serializer=handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(
            wrapped, request_deserializer=Undecoded,
            response_serializer=handler.response_serializer)

    def _may_call(self, service: str, context: _Seen) -> Exception | None:
        """None when the caller's certificate is accepted and admitted and its role may
        call `service`; else why not (`_work` checks again, and audits the refusal). Asked
        before a call takes a place of a file or of the trail: a caller of another role
        takes none (review 3, session 18: eight DCO certificates kept the auditor's calls
        refused TOO_MANY_AUDIT_CALLS)."""
        caller = _caller(self.app, context)
        if caller is None or caller.refusal or \
                caller.role not in SERVICE_ROLES.get(service, frozenset()):
            return error("ROLE_NOT_PERMITTED", "not a caller of this service")
        try:
            admit(self.app, caller)
        except Exception as exc:  # (a refusal, or the HSM or database down)
            return exc
        return None

    async def _received(self, service: str, method: str, inner: Callable, request: Any,
                        context: Any, place: Place) -> Any:
        """A file call once its message came, or not: with none, the client half-closed
        without one, or gRPC refused it (too large, cancelled, a deadline), or the server
        stops. Nothing is then run or audited: a call the client never made (review,
        session 17)."""
        if request is None:
            place.release()
            await _refuse(context, error("SERVER_STOPPING", "the server is stopping; retry")
                          if self.stopping.is_set() else
                          error("INVALID_REQUEST", "the call carried no request message"))
        return await self._call(service, method, inner, request, context, place.release,
                                self.file_pool)

    async def _call(self, service: str, method: str, inner: Callable, request: Any,
                    context: Any, ended: Callable[[], None] | None = None,
                    pool: futures.Executor | None = None) -> Any:
        if pool is None and service == TRAIL_SERVICE:
            why_not = await asyncio.get_running_loop().run_in_executor(
                self.pool, self._may_call, service, _Seen(context))
            if why_not is not None:  # refused, and audited, in `_work`: never run unplaced
                inner, pool = _not_read(why_not), self.pool  # (review 4, session 18)
            else:
                place = self.trail.take(service, context)
                if place is None:
                    await _refuse(context, error(
                        "TOO_MANY_AUDIT_CALLS", f"at most {TRAIL_CALLS_A_CLIENT} audit-trail "
                        f"calls from one certificate, and {TRAIL_CALLS} in all, at once"))
                pool, ended = self.trail_pool, place.release
        pool = pool or self.pool
        # The call's context variables (request id, caller, audit target, trace span) live
        # in `ctx`, entered by the thread doing the work and again on the loop.
        ctx = contextvars.copy_context()
        seen = _Seen(context)
        # Shielded: a client that cancels, or whose deadline passes, stops waiting for the
        # answer but not the call: its work ends, its event is kept, it is logged, as with
        # the synchronous server (review, session 15).
        whole = asyncio.get_running_loop().create_task(
            self._whole(ctx, seen, service, method, inner, request, pool))
        self._calls.add(whole)  # (until it ends, whatever its client does: `drain`)
        whole.add_done_callback(self._calls.discard)
        if ended is not None:  # (a file or trail call's place: held until its work ends)
            whole.add_done_callback(lambda _: ended())
        response, status = await asyncio.shield(whole)
        if status is not None:
            await context.abort_with_status(status)
        return response

    async def _whole(self, ctx: contextvars.Context, seen: _Seen, service: str, method: str,
                     inner: Callable, request: Any, pool: futures.Executor
                     ) -> tuple[Any, Any]:
        """The call's work, its audit event and its log line: (response, failure status)."""
        # At work until its event is queued: a batch of the audit writer waits for it, if
        # it is a small call (the calls' pool).
        with self.app.audit.writer.working(counted=pool is self.pool) as work:
            ctx.run(at_work.set, work)  # (its own events chained before its end: `submit`)
            # Never on the loop itself, not even a small call: the HSM's lock (a file call
            # holds it between breaths), an exhausted session pool or a stalled database
            # would stop every call of the process (review, session 15; measured in
            # session 16: the two Verify calls inline gained nothing over the pool).
            done = await asyncio.get_running_loop().run_in_executor(
                pool, ctx.run, self._work, service, method, inner, request, seen)
            # Fail closed: a call whose event is not kept returns nothing but that, also one
            # that failed anyway: its own reason would answer, unrecorded, a question
            # (KEY_NOT_FOUND against DATABASE_UNAVAILABLE: whether a key exists; review,
            # session 16). The log keeps it; health tells the outage.
            audit_span = ctx.run(lambda: tracing.span("audit.write"))
            ctx.run(audit_span.__enter__)
            try:
                # The events built in the call's context: their target is set there.
                intents, final = ctx.run(done.call.events, done.outcome, done.code)
                await self.app.audit.writer.submit_async(
                    intents + ([final] if final else []), intents=bool(intents), work=work)
            except Exception as exc:
                ctx.run(self._audit_failed, done, method, exc)
            finally:
                ctx.run(audit_span.__exit__, None, None, None)
        return done.response, ctx.run(self._end, done, method)

    def _work(self, service: str, method: str, inner: Callable, request: Any,
              context: _Seen) -> _Done:
        request_id.set(uuid.uuid4().hex[:16])
        spans = contextlib.ExitStack()
        current = spans.enter_context(tracing.call_span(
            method, context.invocation_metadata(), request_id=request_id.get())) \
            if tracing.enabled() else None
        audit_target.set("")
        started = time.perf_counter()
        caller = _caller(self.app, context) or Caller("", "")
        call = self.app.audit.call(caller.identity, caller.role, method.lstrip("/"),
                                   audit_target.get)
        done = _Done(caller, call, started, current, spans)
        # Each write transaction of this call carries its audit event (keysvc/audit/calls.py).
        # (Every call that gets here is audited: health and reflection never do.)
        hook = st.before_commit.set(call.before_commit)
        try:
            if caller.refusal:
                raise error("CERTIFICATE_NOT_ACCEPTED", caller.refusal)
            done.caller = caller = admit(self.app, caller)  # revoked? enrolled? (each call)
            call.actor = caller.identity
            # Deny by default: a service without a role entry is refused to every caller.
            allowed = SERVICE_ROLES.get(service, frozenset())
            if caller.role not in allowed:
                raise error("ROLE_NOT_PERMITTED",
                            f"role {caller.role[:64] or '(none)'} may not call {service}")
            current_caller.set(caller)
            done.response = inner(request, context)
        except Exception as exc:
            done.failure = _failure(exc, method)
            done.code = done.failure.code
        finally:
            st.before_commit.reset(hook)
        if done.failure is not None:
            done.outcome = "DENIED" if done.code in DENIALS else "ERROR"
        return done

    @staticmethod
    def _audit_failed(done: _Done, method: str, exc: Exception) -> None:
        refusal = exc if isinstance(exc, KeysvcError) else \
            error("AUDIT_UNAVAILABLE", "the audit trail cannot be written")
        log.error("audit not kept; the call (which ended %s) fails closed", done.code,
                  extra={"method": method.rsplit("/", 1)[-1], "code": refusal.code})
        done.failure, done.code, done.response = refusal, refusal.code, None

    @staticmethod
    def _end(done: _Done, method: str) -> Any:
        """The call's log line, metrics and span; the status it fails with, if it does."""
        elapsed = time.perf_counter() - done.started
        short = method.rsplit("/", 1)[-1]
        REQUESTS.labels(short, done.code).inc()
        LATENCY.labels(short, done.code).observe(elapsed)
        log.info("call", extra={"method": short, "code": done.code,
                                "actor": done.caller.identity, "role": done.caller.role,
                                "duration_ms": round(elapsed * 1000, 2)})
        tracing.annotate(done.current, role=done.caller.role[:64], code=done.code)
        status = None
        if done.failure is not None:
            tracing.failed(done.current, done.code)
            status = rpc_status.to_status(status_for(done.failure))
        done.spans.close()
        return status


def _failure(exc: Exception, method: str) -> KeysvcError:
    """The error a call ends with: its own, or what an HSM or a bug becomes (never a
    message that could carry data)."""
    if isinstance(exc, KeysvcError):
        return exc
    if isinstance(exc, HsmUnavailable):
        log.warning("HSM unavailable", extra={"method": method, "code": str(exc)[:200]})
        return error("HSM_UNAVAILABLE", "the HSM is unavailable; retry later")
    if isinstance(exc, HsmError):
        log.error("HSM operation failed", extra={"method": method, "code": type(exc).__name__})
        return KeysvcError("internal HSM error")
    if isinstance(exc, (SQLAlchemyError, TimeoutError)):
        log.error("database failed", extra={"method": method, "code": type(exc).__name__})
        return error("DATABASE_UNAVAILABLE", "the database failed or refused the change; "
                                             "retry later")
    log.error("unexpected error", extra={"method": method, "code": type(exc).__name__})
    return KeysvcError("internal error")


# --------------------------------------------------------------------------- health
# The health thread silent this long: NOT_SERVING (`HealthWatch.not_serving`).
HEALTH_SILENT_SECONDS = 30
class HealthWatch(threading.Thread):
    """NOT_SERVING while any token is unusable or the audit trail fails; SERVING again once
    they work. Also the server's other periodic duties: audit intents left by a crash are
    chained, and the client CRLs are read again every `client_crl_refresh_seconds` or when
    `reload` is set (SIGHUP)."""

    def __init__(self, app: App, servicer: health.HealthServicer, now: HealthNow,
                 streams: tuple[LongStreams, ...] = (), every: float = 1.0) -> None:
        super().__init__(daemon=True, name="health-watch")
        self.app, self.servicer, self.every = app, servicer, every
        self.streams = streams  # (ended at a stop)
        self._status: int | None = None  # the status last set
        self.now = now
        self.stopped = threading.Event()
        self.reload = threading.Event()
        self.crls_read_at = time.monotonic()
        self.custody_read_at = 0.0
        self._unbacked: dict[str, int] = {}
        self.ready = False  # the last check's verdict (/readyz)
        self.beat = time.monotonic()  # when `run` last went round

    def custody_if_due(self) -> None:
        """Once a minute: backup freshness (the gauges, and a warning while a long-lived key
        version has no backup) and the removal of backup keys killed ceremonies left
        (keysvc/custody/backup.py)."""
        if time.monotonic() - self.custody_read_at < 60:
            return
        self.custody_read_at = time.monotonic()
        from keysvc.custody.backup import freshness, remove_leftovers
        if processes.INDEX == 0:  # a killed ceremony's backup key, once it is 30 minutes old
            remove_leftovers(self.app)
        for partition, (age, missing) in freshness(self.app).items():
            if missing and missing != self._unbacked.get(partition):
                log.warning("%d long-lived key versions of %s have no backup "
                            "(keysvc admin backup)", missing, partition)
            self._unbacked[partition] = missing

    def reload_crls_if_due(self) -> None:
        due = time.monotonic() - self.crls_read_at >= self.app.settings.client_crl_refresh_seconds
        if due or self.reload.is_set():
            if self.reload.is_set():
                log.info("SIGHUP: the client CRLs will be read again")
            self.reload.clear()
            ok = self.app.load_client_crls()
            # A failed read (the HSM busy, a roster race) is tried again in ten seconds.
            self.crls_read_at = time.monotonic() - (
                0 if ok else max(0.0, self.app.settings.client_crl_refresh_seconds - 10))

    def check(self) -> bool:
        ok = True
        for name, token in self.app.partitions.tokens.items():
            up = token.check()
            HSM_UP.labels(name).set(1 if up else 0)
            HSM_IN_USE.labels(name).set(token.in_use)
            HSM_IDLE.labels(name).set(token.idle)
            ok = ok and up
        ok = ok and self._audit_ok()
        status = (health_pb2.HealthCheckResponse.SERVING if ok
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        if status != self._status:  # (a Watch hears of a change, not of every check)
            for svc in ("", *served_services(self.app)):
                self.servicer.set(svc, status)
            self.now.set(status)
            self._status = status
        self.ready = ok
        return ok

    def not_serving(self) -> None:
        """NOT_SERVING while this thread itself is stuck (a duty waiting for a stalled
        database): it cannot tell, and what it said last is not to be trusted. Called from
        the event loop (`_heartbeat`); the next check that passes says SERVING again."""
        if self._status != health_pb2.HealthCheckResponse.NOT_SERVING:
            log.error("the health thread has not gone round for %d s: NOT_SERVING",
                      HEALTH_SILENT_SECONDS)
            for svc in ("", *served_services(self.app)):
                self.servicer.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
            self.now.set(health_pb2.HealthCheckResponse.NOT_SERVING)
            self._status = health_pb2.HealthCheckResponse.NOT_SERVING
        self.ready = False

    def _settle_roster(self) -> None:
        from keysvc.officers import settle_stale
        settle_stale(self.app)

    def _audit_ok(self) -> bool:
        """NOT_SERVING while the audit trail fails (calls fail closed anyway). While it
        fails, one probe event a check tells when it works again (no traffic comes to a
        NOT_SERVING replica to tell it)."""
        if self.app.audit.healthy():
            return True
        try:
            self.app.audit.append(actor="keysvc", role="", action="audit.probe",
                                  target="the audit trail works again")
        except Exception:
            return False
        return self.app.audit.healthy()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            self.beat = time.monotonic()  # (systemd's watchdog: `_heartbeat`)
            try:
                self.check()
            except Exception as exc:
                log.error("health check failed", extra={"code": type(exc).__name__})
            self.beat = time.monotonic()  # (after a slow check: it went round)
            for duty in (self.app.audit.recover_intents, self.reload_crls_if_due,
                         self._settle_roster, self.custody_if_due):
                try:  # each on its own: one failing stops no other
                    duty()
                except Exception as exc:
                    log.error("periodic duty failed", extra={"code": type(exc).__name__})
                self.beat = time.monotonic()


# --------------------------------------------------------------------------- server
def build_server(app: App, listen: str) -> tuple[grpc.aio.Server, int, HealthWatch,
                                                 KeysvcInterceptor]:
    """The server, its port, its health watch and its interceptor (whose calls, and the
    pool they work in, outlast the server's stop: `KeysvcInterceptor.drain`)."""
    from keysvc.servicers import register_all
    s = app.settings
    max_msg = s.max_file_bytes * 2 + (1 << 20)
    watches = LongStreams("health-watch", HEALTH_WATCH_STREAMS, HEALTH_WATCH_STREAMS_A_CLIENT)
    reflections = LongStreams("reflection", REFLECTION_STREAMS, REFLECTION_STREAMS_A_CLIENT)
    now = HealthNow(asyncio.get_running_loop())
    # The keysvc calls' work runs in `calls` (migration files' in the interceptor's
    # `file_pool`); health's Check (a synchronous servicer, not audited) in gRPC's own pool.
    # A call waiting for its request message, its audit event or its client holds no
    # thread: 16 calls that never sent their message held all of the synchronous server's
    # and stopped every call of a worker (review, session 16).
    calls = futures.ThreadPoolExecutor(max_workers=s.workers, thread_name_prefix="call")
    server = grpc.aio.server(
        futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="grpc"),
        interceptors=[interceptor := KeysvcInterceptor(app, calls, watches, reflections, now)],
        options=[("grpc.max_receive_message_length", max_msg),
                 ("grpc.max_send_message_length", max_msg),
                 # gRPC allows a second server on a bound port by default: only the workers
                 # of one keysvc may share it.
                 ("grpc.so_reuseport", int(processes.COUNT > 1)),
                 # A client gone without a word (its host down, a NAT that forgot it) is
                 # noticed within 80 s, not gRPC's 2 h: a Watch waiting for a change would
                 # hold its stream for that long (review, session 16).
                 ("grpc.keepalive_time_ms", 60_000),
                 ("grpc.keepalive_timeout_ms", 20_000)])
    register_all(server, app)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [keysvc_pb2.DESCRIPTOR.services_by_name[n].full_name
             for n in keysvc_pb2.DESCRIPTOR.services_by_name]
    reflection.enable_server_reflection(names + [health.SERVICE_NAME, reflection.SERVICE_NAME],
                                        server)
    watch = HealthWatch(app, health_servicer, now, streams=(watches, reflections))
    watch.check()
    # The port last: it listens from here on, and a connection that arrives before the
    # server starts (a worker process joining the others' port) waits the shortest time.
    cert, key, ca = s.tls_files
    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())],
                                        root_certificates=ca.read_bytes(),
                                        require_client_auth=True)
    try:
        port = server.add_secure_port(listen, creds)
    except RuntimeError:  # (newer gRPC raises where older returned 0)
        port = 0
    if port == 0:
        raise SystemExit(f"keysvc: cannot listen on {listen}: the address is in use (another "
                         "server?) or not this host's")
    return server, port, watch, interceptor


# At a stop: the in-flight calls drain until STOP_GRACE seconds after the signal; calls
# whose client went finish until STOP_BUDGET (under processes.STOP_GRACE, when a worker that
# has not stopped is killed).
STOP_GRACE = 30.0
STOP_BUDGET = 40.0


# Garbage collection: a 1,000-entry file allocates some 10^5 short-lived objects (parsed
# elements, per-key records and rows); with CPython's default first threshold (700) the
# collector runs hundreds of times a file and each older-generation pass walks every live
# object. Measured on the DCO path (bench/, 1,000 entries): the default costs 5-10 ms a file
# of XML parsing alone; a first threshold of 50,000 brings it back to parsing speed.
# Start-up's long-lived objects are frozen out of every later pass.
GC_THRESHOLDS = (50_000, 20, 10)


def tune_gc() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def start_probes(listen: str, watch: HealthWatch) -> None:
    """The metrics port also answers probes that have no client certificate: /healthz (the
    process is alive) and /readyz (200 while the last health check passed: tokens usable,
    audit trail working; 503 otherwise). Nothing secret is on this port."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Probes(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/metrics":
                code, body, kind = 200, generate_latest(), CONTENT_TYPE_LATEST
            elif self.path == "/healthz":
                code, body, kind = 200, b"ok\n", "text/plain"
            elif self.path == "/readyz":
                ready = watch.ready
                code, body = (200, b"ready\n") if ready else (503, b"not ready\n")
                kind = "text/plain"
            else:
                code, body, kind = 404, b"not found\n", "text/plain"
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # probes every second: not logged
            pass

    host, port = listen.rsplit(":", 1)
    httpd = ThreadingHTTPServer((host, int(port)), Probes)
    threading.Thread(target=httpd.serve_forever, daemon=True, name="probes").start()


async def _heartbeat(watch: HealthWatch) -> None:
    """systemd's WatchdogSec, told from the event loop while the health thread goes round
    too: a loop stopped by one call's work (or the health thread for two minutes) is
    noticed, and the process restarted. Ticked from the health thread alone, a stuck loop
    was not (review, session 17). (Two minutes: a duty waits up to a minute for a stalled
    database, which a restart would not mend.)"""
    watchdog = notify.Watchdog()
    while True:
        silent = time.monotonic() - watch.beat
        if silent > max(HEALTH_SILENT_SECONDS, 3 * watch.every) and not watch.stopped.is_set():
            watch.not_serving()
        if silent < max(120.0, 3 * watch.every):
            watchdog.tick()
            processes.beat()  # (several processes: their supervisor tells systemd)
        await asyncio.sleep(1.0)


def serve(app: App, listen: str, on_ready: Callable[[str], None] | None = None, *,
          announce: bool = True) -> int:
    tune_gc()
    tracing.configure(app.settings, processes.INDEX)
    return asyncio.run(_serve(app, listen, on_ready, announce))


async def _serve(app: App, listen: str, on_ready: Callable[[str], None] | None,
                 announce: bool) -> int:
    server, port, watch, interceptor = build_server(app, listen)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    # On the loop (asyncio's handlers run there, not between two bytecodes of whatever the
    # main thread was doing, which once deadlocked on a lock it held: session 16), and
    # before the server starts: a SIGTERM just after READY killed the process (review,
    # session 17).
    signals: list[int] = []

    def _stop(signum: int) -> None:
        signals.append(signum)
        stopping.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _stop, int(sig))
    loop.add_signal_handler(signal.SIGHUP, watch.reload.set)
    await server.start()
    watch.start()
    heartbeat = loop.create_task(_heartbeat(watch))
    rewrap = None
    if processes.INDEX == 0 and app.settings.rewrap_rows_per_second > 0:
        # one job per server (worker 0), in a process of its own at the lowest priority
        from keysvc.custody.rewrap_process import RewrapProcess
        rewrap = app.rewrap = RewrapProcess(app.settings, app.settings.rewrap_rows_per_second,
                                            app.settings.rewrap_batch)
        rewrap.start()
    if app.settings.metrics_listen:
        host, metrics_port = app.settings.metrics_listen.rsplit(":", 1)
        start_probes(f"{host}:{int(metrics_port) + processes.INDEX}", watch)
    host = listen.rsplit(":", 1)[0]
    bound = f"{host}:{port}"
    if announce:  # (the workers of several processes: their supervisor says it once)
        print(f"listening on {bound}", flush=True)
        notify.notify("READY=1", f"STATUS=listening on {bound}")
    if on_ready:
        on_ready(bound)
    await stopping.wait()
    began = time.monotonic()  # (the stop's budget, STOP_BUDGET, counts from here)
    log.info("signal received; draining in-flight calls", extra={"code": str(signals[0])})
    if announce:
        notify.notify("STOPPING=1", "STATUS=draining in-flight calls")
    watch.stopped.set()
    # NOT_SERVING from here on, to Check and to every open Watch, whose stream then ends
    # (HealthNow, as its last item): a balancer sends no new calls to a server that
    # drains, and the drain waits for no Watch.
    watch.now.stop()
    watch.servicer.enter_graceful_shutdown()
    # The rewrap job (a process at the lowest priority: starved under load, up to 15 s to
    # stop) stops alongside the drain, not before it.
    rewrap_stopped = loop.run_in_executor(None, rewrap.stop) if rewrap is not None else None
    for streams in watch.streams:
        streams.end()  # (an idle reflection stream: the drain would wait its whole grace)
    # The stop's budget, 40 s from the signal (a worker is killed at processes.STOP_GRACE,
    # 45 s): long calls (files, the trail's) start for at most 5 s more (then
    # SERVER_STOPPING), small ones until the server's GOAWAY; the calls being answered,
    # on open connections, until 20 s, then after the GOAWAY until 30 s; calls whose
    # client went (cancel, deadline, the grace ended) finish their work, event and log
    # line, until 40 s.
    await interceptor.quiet()
    # A file call whose file has not come 10 s before the grace ends is UNAVAILABLE, so
    # that one that never comes does not hold the stop for the whole grace; one on its way
    # meanwhile is served (set at once, it refused a file being uploaded: review).
    loop.call_later(max(0.0, STOP_GRACE - 10 - (time.monotonic() - began)),
                    interceptor.stopping.set)
    await interceptor.settle(timeout=max(0.0, STOP_GRACE - 10 - (time.monotonic() - began)))
    await server.stop(grace=max(1.0, STOP_GRACE - (time.monotonic() - began)))
    left = await interceptor.drain(timeout=max(1.0, STOP_BUDGET - (time.monotonic() - began)))
    heartbeat.cancel()
    if rewrap_stopped is not None:
        await rewrap_stopped
    if left:
        # Closing the HSM and the database under them, or waiting for them, would be worse:
        # the process ends now. A call with an effect committed its audit intent with it,
        # and the next start chains it (keysvc/audit/calls.py).
        log.error("%d calls still at work %g s after the signal; the process ends without "
                  "them", left, STOP_BUDGET)
        logging.shutdown()
        os._exit(1)
    for pool in (interceptor.pool, interceptor.file_pool, interceptor.trail_pool):
        await loop.run_in_executor(None, pool.shutdown, True)
    tracing.shutdown()
    app.close()
    log.info("stopped")
    return 0
