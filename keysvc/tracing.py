"""OpenTelemetry traces: where a slow call spent its time (issue 17).

One span per call, and children for the file's parse and schema checks, each HSM loop (with
its key count), each database write transaction, the audit write and the DeviceCertificate
checks. Off unless `otlp_endpoint` is set; then spans go to that OTLP/gRPC collector in
batches, from each server process. A caller's `traceparent` (and nothing else it sends:
not `tracestate`, not baggage) makes keysvc's spans part of its trace; every call is
recorded whatever the caller's sampling flag says.

Spans never carry a key, PIN or plaintext: attributes are named in ATTRIBUTES and nothing
else is accepted (checked also when tracing is off), and their values are counts, codes and
identifiers that already appear in logs and audit events (a test exports spans from a real
server and scans them for key bits). When tracing is off, `span()` returns one shared no-op
context: no OpenTelemetry call at all. Tracing never changes a call's outcome: a failure in
it is logged by type and the call goes on untraced.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keysvc.config import Settings

# The only attribute names a keysvc span may carry (prefixed "keysvc." when recorded).
ATTRIBUTES = frozenset({
    "request_id", "role", "code", "partition", "keys", "installations", "entries",
    "certificates", "rows", "bytes", "view", "schema", "what",
})

_NOOP = contextlib.nullcontext()
_tracer: Any = None
_provider: Any = None
_propagator: Any = None
# How long the exporter waits for a collector that accepts and never answers (drain waits
# for the last batch at most this long).
EXPORT_TIMEOUT_SECONDS = 5
log = logging.getLogger(__name__)


def enabled() -> bool:
    return _tracer is not None


def configure(settings: Settings, process_index: int = 0) -> None:
    """Tracing on for this process when an OTLP endpoint is configured (each worker process
    calls this after the fork: exporters' threads do not survive one)."""
    if not settings.otlp_endpoint:
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    endpoint = settings.otlp_endpoint
    insecure = endpoint.startswith("http://")
    credentials = None
    if not insecure and settings.otlp_ca:
        import grpc
        with open(settings.otlp_ca, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
    exporter = OTLPSpanExporter(endpoint=endpoint.split("://", 1)[-1], insecure=insecure,
                                credentials=credentials, timeout=EXPORT_TIMEOUT_SECONDS)
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON
    provider = TracerProvider(sampler=ALWAYS_ON, resource=Resource.create({
        "service.name": "keysvc", "service.instance.id": f"worker-{process_index}"}))
    provider.add_span_processor(BatchSpanProcessor(
        exporter, export_timeout_millis=EXPORT_TIMEOUT_SECONDS * 1000))
    # The SDK's own warnings quote what callers send (a malformed header, say): errors only.
    logging.getLogger("opentelemetry").setLevel(logging.ERROR)
    use(provider)


def use(provider: Any) -> None:
    """Send spans to this TracerProvider (configure(); tests pass one with an in-memory
    exporter). None turns tracing off."""
    global _tracer, _provider, _propagator
    _provider = provider
    _tracer = provider.get_tracer("keysvc") if provider is not None else None
    if provider is not None and _propagator is None:
        # W3C trace context, built here rather than taken from OTEL_PROPAGATORS: the
        # environment must not be able to make every call fail (an unknown propagator).
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        _propagator = TraceContextTextMapPropagator()


def shutdown() -> None:
    """Flush what is batched (at drain)."""
    if _provider is not None:
        _provider.shutdown()


def _check(values: Mapping[str, Any]) -> None:
    """A programming error, caught by the tests whether or not tracing is on: only listed
    names, and only counts or short words as values."""
    if not ATTRIBUTES.issuperset(values):
        raise ValueError(f"span attributes not in tracing.ATTRIBUTES: "
                         f"{sorted(set(values) - ATTRIBUTES)}")
    for k, v in values.items():
        if not (v is None or isinstance(v, int) or (isinstance(v, str) and len(v) <= 64)):
            raise ValueError(f"span attribute {k} must be a count or a short word")


def _attributes(values: Mapping[str, Any]) -> dict[str, Any]:
    _check(values)
    return {f"keysvc.{k}": v for k, v in values.items() if v is not None}


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    """A child span of the current call's span; the shared no-op when tracing is off or
    when there is no call (background work: the rewrap, the health loop, the audit writer
    would otherwise each start traces of their own)."""
    if attributes:
        _check(attributes)
    if _tracer is None or not _in_call():
        return _NOOP
    # An exception's text is not recorded: the call span carries keysvc's code instead.
    return _guarded(lambda: _tracer.start_as_current_span(
        name, attributes=_attributes(attributes), record_exception=False,
        set_status_on_exception=False))


@contextlib.contextmanager
def _guarded(make: Any) -> Iterator[Any]:
    """A span whose start or end fails is logged (by type) and skipped: tracing never
    decides a call (around the audit write, a failure would otherwise fail the call)."""
    try:
        started = make()
        current = started.__enter__()
    except Exception as exc:
        log.warning("span not traced: %s", type(exc).__name__)
        yield None
        return
    try:
        yield current
    finally:
        try:
            started.__exit__(None, None, None)
        except Exception as exc:
            log.warning("span not ended: %s", type(exc).__name__)


def _in_call() -> bool:
    from opentelemetry import trace
    return trace.get_current_span().is_recording()


def annotate(current: Any, **attributes: Any) -> None:
    """Attributes known only once the work is done (a count, an outcome code)."""
    if current is not None:
        current.set_attributes(_attributes(attributes))


@contextlib.contextmanager
def call_span(method: str, metadata: Any, **attributes: Any) -> Iterator[Any]:
    """The server span of one RPC, a child of the caller's trace when it sent
    `traceparent`. Yields the span (None when tracing is off)."""
    if _tracer is None:
        yield None
        return
    def start() -> Any:
        from opentelemetry.trace import SpanKind
        parent = None
        traceparent = next((v for k, v in (metadata or ()) if k == "traceparent"
                            and isinstance(v, str) and len(v) <= 128), None)
        if traceparent is not None:
            parent = _propagator.extract({"traceparent": traceparent})
        service, _, short = method.lstrip("/").partition("/")
        attrs = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": short,
                 **_attributes(attributes)}
        return _tracer.start_as_current_span(
            method.lstrip("/"), context=parent, kind=SpanKind.SERVER, attributes=attrs,
            record_exception=False, set_status_on_exception=False)
    with _guarded(start) as current:  # tracing never decides a call
        yield current


def failed(current: Any, code: str) -> None:
    """Mark a call span as failed with keysvc's code (never the message: the code is the
    whole of what a trace needs, and a message is text the span does not vet)."""
    if current is not None:
        from opentelemetry.trace import Status, StatusCode
        current.set_attribute("keysvc.code", code)
        current.set_status(Status(StatusCode.ERROR, code))
