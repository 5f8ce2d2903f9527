"""The audit file that every worker process appends to (keysvc/audit/sinks.py, issue 18).

Each process reads from the file how far it goes before each batch (another worker may have
written since). The host's files are not trusted: a file cut or deleted while keysvc runs
must not be taken as a new start (which would make VerifyAuditLog pass without the cut
events), and a lock file held by someone else must fail calls closed, not hang them.
"""
from __future__ import annotations

import fcntl
import os

import pytest

from keysvc.audit.sinks import JsonlSink, read_lines
from keysvc.errors import KeysvcError


def _events(app, n: int) -> None:
    for i in range(n):
        app.audit.append(actor="o", role="security-officer",
                         action="keysvc.v1.KeyAdministrationService/ListKeys", target=str(i))


@pytest.mark.parametrize("how", ["unlink", "truncate"])
def test_an_audit_file_cut_while_serving_is_not_taken_for_a_new_start(any_app, tmp_path, how):
    path = tmp_path / "audit.jsonl"
    any_app.audit._sinks = [JsonlSink(path)]
    _events(any_app, 3)
    assert any_app.audit.verify(sink=path).intact
    if how == "unlink":
        path.unlink()
    else:
        os.truncate(path, 0)
    _events(any_app, 2)
    assert not any("sink_started_at" in x for x in read_lines(path))
    v = any_app.audit.verify(sink=path)
    assert not v.intact and "audit file" in v.detail


def test_two_writers_of_one_audit_file_keep_every_event_once(any_app, tmp_path):
    """Two sinks on one file stand for two worker processes: each learns from the file what
    the other wrote, and the file holds the chain, each event once."""
    path = tmp_path / "audit.jsonl"
    a, b = JsonlSink(path), JsonlSink(path)
    any_app.audit._sinks = [a]
    _events(any_app, 2)
    any_app.audit._sinks = [b]
    _events(any_app, 2)
    any_app.audit._sinks = [a]
    _events(any_app, 1)
    seqs = [x["seq"] for x in read_lines(path) if x.get("seq")]
    assert seqs == sorted(set(seqs)) and len(seqs) >= 5
    assert any_app.audit.verify(sink=path).intact


def test_a_held_audit_file_lock_fails_calls_closed(any_app, tmp_path):
    path = tmp_path / "audit.jsonl"
    any_app.audit._sinks = [JsonlSink(path, lock_timeout=0.5)]
    _events(any_app, 1)
    fd = os.open(str(path) + ".lock", os.O_RDONLY)  # a read-only open is enough to hold it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(KeysvcError) as ei:
            _events(any_app, 1)
        assert ei.value.code == "AUDIT_UNAVAILABLE"
    finally:
        os.close(fd)
    _events(any_app, 1)  # released: the trail goes on
