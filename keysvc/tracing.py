"""OpenTelemetry traces: where a slow call spent its time (issue 17).

One span per call, and children for the file's parse and schema checks, each HSM loop (with
its key count), each database write transaction, the audit write and the DeviceCertificate
checks. Off unless `otlp_endpoint` is set; then spans go to that OTLP/gRPC collector in
batches, from each server process. A caller's `traceparent` is honoured, so an S1SP's own
trace shows keysvc's spans under its call.

Spans never carry a key, PIN or plaintext: attributes are named in ATTRIBUTES and nothing
else is accepted, and their values are counts, codes and identifiers that already appear in
logs and audit events (a test exports spans from a real server and scans them for key bits).
When tracing is off, `span()` returns one shared no-op context: no OpenTelemetry call at all.
"""
from __future__ import annotations

import contextlib
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
                                credentials=credentials)
    provider = TracerProvider(resource=Resource.create({
        "service.name": "keysvc", "service.instance.id": f"worker-{process_index}"}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    use(provider)


def use(provider: Any) -> None:
    """Send spans to this TracerProvider (configure(); tests pass one with an in-memory
    exporter). None turns tracing off."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer("keysvc") if provider is not None else None


def shutdown() -> None:
    """Flush what is batched (at drain)."""
    if _provider is not None:
        _provider.shutdown()


def _attributes(values: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(values) - ATTRIBUTES
    if unknown:  # a programming error, caught by the tests: never record an unlisted name
        raise ValueError(f"span attributes not in tracing.ATTRIBUTES: {sorted(unknown)}")
    return {f"keysvc.{k}": v for k, v in values.items() if v is not None}


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    """A child span of the current call's span; the shared no-op when tracing is off or
    when there is no call (background work: the rewrap, the health loop, the audit writer
    would otherwise each start traces of their own)."""
    if _tracer is None or not _in_call():
        return _NOOP
    # An exception's text is not recorded: the call span carries keysvc's code instead.
    return _tracer.start_as_current_span(name, attributes=_attributes(attributes),
                                         record_exception=False,
                                         set_status_on_exception=False)


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
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind
    carrier = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
    service, _, short = method.lstrip("/").partition("/")
    attrs = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": short,
             **_attributes(attributes)}
    with _tracer.start_as_current_span(method.lstrip("/"), context=propagate.extract(carrier),
                                       kind=SpanKind.SERVER, attributes=attrs,
                                       record_exception=False,
                                       set_status_on_exception=False) as current:
        yield current


def failed(current: Any, code: str) -> None:
    """Mark a call span as failed with keysvc's code (never the message: the code is the
    whole of what a trace needs, and a message is text the span does not vet)."""
    if current is not None:
        from opentelemetry.trace import Status, StatusCode
        current.set_attribute("keysvc.code", code)
        current.set_status(Status(StatusCode.ERROR, code))
