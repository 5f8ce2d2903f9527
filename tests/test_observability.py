"""Metrics and logs: request counts, latencies and pool gauges; JSON logs; no secrets."""
from __future__ import annotations

import json
import re
import urllib.request

import pytest

from keysvc.api.v1 import keysvc_pb2 as pb
from tests.serverproc import free_port, start_server
from tests.support import encoder


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    state = tmp_path_factory.mktemp("observed")
    factory = encoder.DeviceCertificateFactory()
    ca = state.parent / f"{state.name}-ca.pem"
    ca.write_bytes(factory.ca_pem)
    port = free_port()
    srv = start_server(state, trust_anchors=[ca],
                       env={"KEYSVC_METRICS_LISTEN": f"127.0.0.1:{port}"})
    installs = encoder.random_installations(3, cert_factory=factory)
    data, keks = srv.keyed_file("OBS", "SMSO-O", installs, "MGEF-OBS-1")
    srv.as_("s1sp").s1sp.ProcessGroupInformation(pb.ProcessGroupInformationRequest(file=data))
    srv.as_("dco").dco.UnwrapMasterKeys(pb.UnwrapMasterKeysRequest(file=data))
    secrets = [k for i in installs for k in (i.auth_key, i.enc_key, i.prepay_key,
                                             i.gsme_prepay_key, i.master_key) if k]
    secrets += keks
    yield srv, f"http://127.0.0.1:{port}/metrics", secrets
    srv.stop()


def _scrape(url: str) -> str:
    import time
    for _ in range(20):  # the health watch fills the gauges about once a second
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        if "keysvc_hsm_sessions_idle" in body:
            return body
        time.sleep(0.2)
    return body


def test_metrics_count_requests_per_rpc_and_outcome_code(observed):
    _, url, _ = observed
    body = _scrape(url)
    assert 'keysvc_requests_total{code="OK",method="ProcessGroupInformation"} 1.0' in body
    assert 'keysvc_requests_total{code="OK",method="UnwrapMasterKeys"} 1.0' in body
    assert 'keysvc_request_seconds_bucket{code="OK",le="0.5",method="UnwrapMasterKeys"}' in body


def test_metrics_count_the_events_each_audit_batch_holds(observed):
    """How well the audit writer groups the calls' events (each batch has a fixed cost):
    batches counted, and every event of them."""
    _, url, _ = observed
    body = _scrape(url)
    batches = float(re.search(r"^keysvc_audit_batch_events_count (\S+)$", body, re.M)[1])
    events = float(re.search(r"^keysvc_audit_batch_events_sum (\S+)$", body, re.M)[1])
    assert batches >= 2 and events >= batches  # ProcessGroupInformation, UnwrapMasterKeys


def test_metrics_report_hsm_session_pool_gauges(observed):
    _, url, _ = observed
    body = _scrape(url)
    for partition in ("s1sp", "dco", "admin"):
        assert f'keysvc_hsm_sessions_idle{{partition="{partition}"}}' in body
        assert f'keysvc_hsm_available{{partition="{partition}"}} 1.0' in body


def test_logs_are_json_lines_with_a_request_id(observed):
    srv, _, _ = observed
    calls = [json.loads(line) for line in srv.log().splitlines()
             if line.startswith("{") and '"msg":"call"' in line]
    assert calls and all(c["request_id"] and c["method"] and c["code"] for c in calls)


def test_neither_logs_nor_metrics_carry_a_key(observed):
    srv, url, secrets = observed
    text = srv.log() + _scrape(url)
    for key in secrets:
        for form in (key.hex(), key.hex().upper()):
            assert form not in text


def test_probes_without_a_client_certificate_say_alive_and_ready(observed):
    import urllib.error
    srv, url, _ = observed
    base = url.rsplit("/", 1)[0]
    assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200
    assert urllib.request.urlopen(base + "/readyz", timeout=5).status == 200
    try:
        urllib.request.urlopen(base + "/other", timeout=5)
        raise AssertionError("no 404")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
