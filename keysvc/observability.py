"""Structured JSON logs with a request id, and Prometheus metrics.

Neither ever carries a key, plaintext or PIN: log records are built from fixed messages and
codes, and metric labels are method names, status codes and partition names only.
"""
from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

from prometheus_client import Counter, Gauge, Histogram

from keysvc import processes

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

REQUESTS = Counter("keysvc_requests_total", "RPCs handled", ["method", "code"])
LATENCY = Histogram("keysvc_request_seconds", "RPC latency", ["method", "code"],
                    buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
HSM_IN_USE = Gauge("keysvc_hsm_sessions_in_use", "HSM sessions borrowed", ["partition"])
HSM_IDLE = Gauge("keysvc_hsm_sessions_idle", "HSM sessions idle in the pool", ["partition"])
HSM_UP = Gauge("keysvc_hsm_available", "1 when the partition's token answers", ["partition"])


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        rid = request_id.get()
        if rid:
            out["request_id"] = rid
        if processes.COUNT > 1:  # which worker process wrote the line
            out["worker"] = processes.INDEX
        for k in ("method", "code", "actor", "role", "duration_ms"):
            if hasattr(record, k):
                out[k] = getattr(record, k)
        if record.exc_info and record.exc_info[0] is not None:
            out["exception"] = record.exc_info[0].__name__  # the type only, never the text
        return json.dumps(out, separators=(",", ":"))


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("alembic").setLevel(logging.WARNING)
AUDIT_LAG = Gauge("keysvc_audit_queue_events", "calls waiting for the audit writer")
AUDIT_BATCH = Histogram("keysvc_audit_batch_events",
                        "events chained a batch: the fewer, the more each costs (a batch has "
                        "a fixed cost of a few ms of CPU under load)",
                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 512))
AUDIT_ANCHORS = Gauge("keysvc_audit_anchor_objects",
                      "audit anchors in the admin token (one per writer slot ever used, and "
                      "fixed ones); every batch reads them all")
AUDIT_SINK_LAG = Gauge("keysvc_audit_sink_lag_events",
                       "events chained in the database and not yet in a sink", ["sink"])
AUDIT_FAILURES = Counter("keysvc_audit_failures_total",
                         "audit batches or waits that failed (calls failed closed)", ["reason"])
MEMORY_LOCKED = Gauge("keysvc_memory_locked", "1 when the process memory is locked (mlockall)")
AUDIT_FILE_CUT = Counter("keysvc_audit_file_cut_total",
                         "times the audit file was found to end before where it had ended")
