"""Traces (issue 17): a span per call with children for parsing, schema, the HSM loops (with
key counts), database transactions, certificate checks and the audit write; off by default;
sent to an OTLP collector when one is configured; never a key, PIN or plaintext.

The collector here is a real OTLP/gRPC endpoint (the TraceService of opentelemetry-proto) in
the test process; the server is a real `keysvc serve` exporting to it.
"""
from __future__ import annotations

import base64
import threading
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc

from keysvc import tracing
from keysvc.api.v1 import keysvc_pb2 as pb
from tests.serverproc import free_port, start_server
from tests.support import encoder

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
UNSAMPLED_TRACE = "0af7651916cd43dd8448eb211c80319c"


class Collector(ts_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 (the protocol's name)
        with self.lock:
            self.requests.append(request.SerializeToString())
        return ts.ExportTraceServiceResponse()

    def spans(self) -> list:
        out = []
        for raw in self.requests:
            req = ts.ExportTraceServiceRequest.FromString(raw)
            out += [s for r in req.resource_spans for ss in r.scope_spans for s in ss.spans]
        return out


def _attrs(span) -> dict:
    out = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = v.string_value if v.HasField("string_value") else v.int_value
    return out


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    collector = Collector()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ts_grpc.add_TraceServiceServicer_to_server(collector, grpc_server)
    port = free_port()
    grpc_server.add_insecure_port(f"127.0.0.1:{port}")
    grpc_server.start()
    state = tmp_path_factory.mktemp("traced")
    factory = encoder.DeviceCertificateFactory()
    ca = state.parent / f"{state.name}-ca.pem"
    ca.write_bytes(factory.ca_pem)
    # OTEL_PROPAGATORS names a propagator that is not installed: keysvc uses its own
    srv = start_server(state, trust_anchors=[ca],
                       env={"KEYSVC_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                            "OTEL_PROPAGATORS": "b3", "KEYSVC_DEV": "on"})
    installs = encoder.random_installations(3, cert_factory=factory)
    data, keks = srv.keyed_file("TRC", "SMSO-T", installs, "MGEF-TRC-1")
    traceparent = (("traceparent", f"00-{CALLER_TRACE}-00f067aa0ba902b7-01"),)
    s1sp = srv.as_("s1sp").s1sp
    s1sp.ProcessGroupInformation(pb.ProcessGroupInformationRequest(file=data),
                                 metadata=traceparent)
    s1sp.VerifyPrepaymentKey(pb.VerifyPrepaymentKeyRequest(
        device_id=installs[0].esme, expected_kcv=encoder.kcv(installs[0].prepay_key)))
    srv.as_("dco").dco.UnwrapMasterKeys(pb.UnwrapMasterKeysRequest(file=data))
    # a caller that asks not to be sampled and sends its own trace state and baggage
    hostile = (("traceparent", f"00-{UNSAMPLED_TRACE}-00f067aa0ba902b7-00"),
               ("tracestate", "injected=anything-the-caller-wants"),
               *(("baggage", f"INJECTED{i}=\"x\"") for i in range(50)))
    s1sp.VerifyPrepaymentKey(pb.VerifyPrepaymentKeyRequest(
        device_id=installs[0].esme, expected_kcv=encoder.kcv(installs[0].prepay_key)),
        metadata=hostile)
    with pytest.raises(grpc.RpcError):
        s1sp.ProcessGroupInformation(pb.ProcessGroupInformationRequest(file=b"<no"))
    srv.stop()  # drains: the batched spans are flushed
    grpc_server.stop(0)
    secrets = [k for i in installs for k in (i.auth_key, i.enc_key, i.prepay_key,
                                             i.gsme_prepay_key, i.master_key) if k]
    secrets += keks
    pins = [p.read_text().strip() for p in (state / "hsm" / "pins").glob("*pin")]
    yield collector, secrets, pins, srv


def test_each_call_is_a_server_span_named_after_its_method(traced):
    collector = traced[0]
    calls = {s.name for s in collector.spans() if s.kind == s.SPAN_KIND_SERVER}
    assert {"keysvc.v1.S1SPService/ProcessGroupInformation",
            "keysvc.v1.S1SPService/VerifyPrepaymentKey",
            "keysvc.v1.DCOService/UnwrapMasterKeys"} <= calls


def test_a_file_call_has_children_for_parse_schema_hsm_database_certificates_and_audit(
        traced):
    collector = traced[0]
    spans = collector.spans()
    call = next(s for s in spans if s.name.endswith("/ProcessGroupInformation")
                and _attrs(s).get("keysvc.code") == "OK")
    children = [s for s in spans if s.trace_id == call.trace_id and s is not call]
    names = {s.name for s in children}
    assert {"xml.parse", "xml.schema", "hsm.decrypt_group_information",
            "validate_installations", "hsm.wrap_device_keys", "hsm.session",
            "certificates.verdicts", "db.transaction", "audit.write"} <= names
    wrap = next(s for s in children if s.name == "hsm.wrap_device_keys")
    assert _attrs(wrap)["keysvc.keys"] > 0  # the loop's key count
    dco = next(s for s in spans if s.name.endswith("/UnwrapMasterKeys"))
    unwrap = next(s for s in spans if s.trace_id == dco.trace_id
                  and s.name == "hsm.unwrap_master_keys")
    assert _attrs(unwrap)["keysvc.entries"] == 3


def test_the_callers_traceparent_makes_keysvc_spans_part_of_its_trace(traced):
    collector = traced[0]
    call = next(s for s in collector.spans() if s.name.endswith("/ProcessGroupInformation")
                and _attrs(s).get("keysvc.code") == "OK")
    assert call.trace_id.hex() == CALLER_TRACE


def test_a_refused_call_is_an_error_span_with_the_code_and_no_message(traced):
    collector = traced[0]
    bad = next(s for s in collector.spans() if s.name.endswith("/ProcessGroupInformation")
               and _attrs(s).get("keysvc.code") == "MALFORMED_XML")
    assert bad.status.code == bad.status.STATUS_CODE_ERROR
    assert bad.status.message == "MALFORMED_XML"
    assert not bad.events  # no exception text recorded


def test_no_span_carries_a_key_pin_or_plaintext(traced):
    collector, secrets, pins, _ = traced
    blob = b"".join(collector.requests)
    assert blob
    for key in secrets:
        for form in (key, key.hex().encode(), key.hex().upper().encode(),
                     base64.b64encode(key)):
            assert form not in blob
    for pin in pins:
        assert pin.encode() not in blob


def test_only_listed_attribute_names_are_recorded(traced):
    collector = traced[0]
    for s in collector.spans():
        for key in _attrs(s):
            assert key.startswith("rpc.") or key.removeprefix("keysvc.") in \
                tracing.ATTRIBUTES, key


def test_the_callers_trace_state_baggage_and_sampling_flag_are_not_taken(traced):
    """Only `traceparent` is read: keysvc records every call (an unsampled caller still
    gets spans), exports none of the caller's trace state, and never logs its baggage."""
    collector, _, _, srv = traced
    unsampled = [s for s in collector.spans() if s.trace_id.hex() == UNSAMPLED_TRACE]
    assert any(s.kind == s.SPAN_KIND_SERVER for s in unsampled)
    assert all(not s.trace_state for s in collector.spans())
    assert b"injected" not in b"".join(collector.requests).lower()
    assert "INJECTED" not in srv.log()


def test_an_unknown_propagator_in_the_environment_changes_no_call(traced):
    """OTEL_PROPAGATORS=b3 (not installed) was set for the server: every call above was
    served, and audited."""
    collector, _, _, srv = traced
    assert '"code":"OK"' in srv.log() and "Propagator" not in srv.log()
    calls = {s.name for s in collector.spans() if s.kind == s.SPAN_KIND_SERVER}
    assert "keysvc.v1.DCOService/UnwrapMasterKeys" in calls


# ------------------------------------------------------------------- in process, in memory
def test_tracing_is_off_by_default_and_costs_one_shared_no_op():
    assert not tracing.enabled()
    assert tracing.span("hsm.session", keys=1) is tracing.span("db.transaction")


def test_an_unlisted_attribute_or_a_long_value_is_refused_also_when_tracing_is_off():
    assert not tracing.enabled()
    with pytest.raises(ValueError, match="not in tracing.ATTRIBUTES"):
        tracing.span("x", plaintext="no")
    with pytest.raises(ValueError, match="a count or a short word"):
        tracing.span("x", what="k" * 65)


def test_spans_go_to_an_in_memory_exporter_and_refuse_unlisted_attributes(app):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from keysvc import s1sp
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    try:
        with tracing.call_span("/keysvc.v1.S1SPService/VerifyPrepaymentKey", ()):
            with pytest.raises(Exception):
                s1sp.verify_prepayment_key(app, "10-FF-FF-FF-FF-FF-FF-FE", "0000000000")
            with pytest.raises(ValueError, match="not in tracing.ATTRIBUTES"):
                tracing.span("x", plaintext="no")
        with tracing.span("outside a call"):
            pass  # background work starts no trace of its own
    finally:
        tracing.use(None)
    names = [s.name for s in exporter.get_finished_spans()]
    assert "keysvc.v1.S1SPService/VerifyPrepaymentKey" in names
    assert "outside a call" not in names
