"""AuditService: events hash-chained and MACed in the HSM; tampering is found and named."""
from __future__ import annotations

import pytest
from sqlalchemy import select, text, update

from keysvc import store as st
from keysvc.api.v1 import keysvc_pb2 as pb


def _events(app, n=5):
    return [app.audit.append(actor=f"officer-{i % 2}", role="security-officer",
                             action="keysvc.v1.KeyAdministrationService/ListKeys",
                             target=str(i)) for i in range(n)]


def test_untouched_log_verifies_intact(any_app):
    _events(any_app)
    v = any_app.audit.verify()
    assert v.intact and v.events_checked == 5 and v.first_bad_event_id == ""


def test_a_verification_lets_other_callers_reach_the_hsm_every_32_events(app, monkeypatch):
    """One HSM lock serves every token: a verification that held it for 1,024 events at a
    time (about 170 ms) made the S1SP's calls wait 0.8 s at the median (review, session
    18)."""
    _events(app, 100)
    breaths = []
    real = type(app.partitions.admin).breathe
    monkeypatch.setattr(type(app.partitions.admin), "breathe",
                        lambda token: breaths.append(1) or real(token))
    assert app.audit.verify().intact
    assert len(breaths) >= 100 // 32


@pytest.mark.parametrize("failure", ["HsmUnavailable", "HsmOperationFailed"])
def test_an_hsm_failing_during_a_verification_fails_it_and_names_no_event(app, monkeypatch,
                                                                           failure):
    """The HSM going away, or an operation failing, at the 50th MAC is an outage
    (HSM_UNAVAILABLE), not an event altered: it named event 50 as failing its MAC (review
    3, session 18), and a failed operation ended INTERNAL (review 4)."""
    from keysvc import hsm
    from keysvc.custody import versions
    from keysvc.hsm import HsmUnavailable
    _events(app, 100)
    macs = []
    real = versions.MacKeys.mac

    def going(self, data, version=None):
        macs.append(1)
        if len(macs) == 50:
            raise getattr(hsm.errors, failure)("token gone")
        return real(self, data, version)
    monkeypatch.setattr(versions.MacKeys, "mac", going)
    with pytest.raises(HsmUnavailable):
        app.audit.verify()


def test_edited_event_is_found_and_named(any_app):
    events = _events(any_app)
    with any_app.store.tx() as conn:
        conn.execute(update(st.audit_events).where(st.audit_events.c.id == events[2].id)
                     .values(outcome="OK", actor="somebody-else"))
    v = any_app.audit.verify()
    assert not v.intact and v.first_bad_event_id == events[2].id


def test_deleted_event_is_found_and_the_next_one_named(any_app):
    events = _events(any_app)
    with any_app.store.tx() as conn:
        conn.execute(st.audit_events.delete().where(st.audit_events.c.id == events[1].id))
    v = any_app.audit.verify()
    assert not v.intact and v.first_bad_event_id == events[2].id


def test_deleting_the_newest_event_is_found(any_app):
    events = _events(any_app)
    with any_app.store.tx() as conn:
        conn.execute(st.audit_events.delete().where(st.audit_events.c.id == events[-1].id))
    assert not any_app.audit.verify().intact


def _cut_the_end(app, events, keep: int) -> None:
    """Delete the newest events and set the head back, as someone with DB access could."""
    with app.store.tx() as conn:
        conn.execute(st.audit_events.delete().where(st.audit_events.c.seq > keep))
        last = conn.execute(select(st.audit_events).where(st.audit_events.c.seq == keep)).one()
        conn.execute(update(st.audit_head).values(seq=keep, hash=last.hash))


def _reopened(app):
    """The same database and tokens in a new App: what a restart sees."""
    from keysvc.app import App
    from keysvc.device_certificate import TrustStore
    from keysvc.store import Store
    store = Store(app.store.url)
    store.migrate()
    return App(app.settings, store, app.partitions, TrustStore(anchors=()))


def test_events_cut_from_the_end_with_the_head_set_back_are_found_by_the_hsm_anchor(any_app):
    events = _events(any_app)
    _cut_the_end(any_app, events, keep=3)
    v = any_app.audit.verify()
    assert (v.intact, v.events_checked, v.first_bad_event_id) == (False, 3, "")
    assert "HSM anchor has sequence 5" in v.detail


def test_the_last_event_cut_is_found_too(any_app):
    """The anchor advances with every batch: nothing can be cut unseen."""
    events = _events(any_app)
    _cut_the_end(any_app, events, keep=4)
    assert "HSM anchor has sequence 5" in any_app.audit.verify().detail


def test_an_erased_log_is_found_also_after_a_restart(any_app):
    _events(any_app)
    with any_app.store.tx() as conn:
        conn.execute(st.audit_events.delete())
        conn.execute(st.audit_head.delete())
    assert "HSM anchor has sequence 5" in any_app.audit.verify().detail
    assert "HSM anchor has sequence 5" in _reopened(any_app).audit.verify().detail


def test_keysvc_never_starts_a_new_chain_silently(any_app):
    """An erased or cut chain is not appended to, here or after a restart; an operator who
    must go on says so (`keysvc audit-new-chain`), and the new chain's first event says
    what was lost."""
    import pytest

    from keysvc.errors import KeysvcError
    events = _events(any_app)
    _cut_the_end(any_app, events, keep=2)
    for app in (any_app, _reopened(any_app)):
        with pytest.raises(KeysvcError) as info:
            _events(app, 1)
        assert info.value.code == "AUDIT_UNAVAILABLE" and "HSM anchor" in info.value.message
    app = _reopened(any_app)
    first = app.audit.new_chain("database restored from backup (ticket 42)")
    assert first.sequence == 3 and "sequence 5" in first.target and "ticket 42" in first.target
    _events(app, 2)
    assert app.audit.verify(sink=None).events_checked == 5


def test_each_writer_moves_one_anchor_object_which_names_the_head(any_app):
    """20 batches leave one anchor object in the token, not 20: the writer rewrites its
    label (keysvc/audit/anchor.py), and no fixed anchor is made."""
    from keysvc.audit.anchor import Anchor
    from keysvc.hsm import keys as hk
    _events(any_app, 20)
    label = f"audit-anchor:{any_app.records.instance}"
    with any_app.partitions.admin.session() as s:
        moving = hk.moving(s, label)
        fixed = hk.data_values(s, label)
    with any_app.store.engine.connect() as conn:
        head = conn.execute(select(st.audit_head)).one()
    slot = any_app.audit.anchor().slots.name()
    assert [lbl for _, lbl in moving] == [f"{label}@{slot}@20:{head.hash}".encode()]
    assert fixed == [] and any_app.audit.anchor().read() == Anchor(20, head.hash)


def _moving_anchors(app) -> list[bytes]:
    from keysvc.hsm import keys as hk
    with app.partitions.admin.session() as s:
        return [lbl for _, lbl in hk.moving(s, f"audit-anchor:{app.records.instance}")]


def test_an_anchor_another_writer_destroyed_is_made_again(any_app):
    """A writer whose anchor object another process pruned (or `audit new-chain` replaced)
    makes a new one at its next batch: no call fails, and the token names the head."""
    from keysvc.hsm import keys as hk
    _events(any_app, 3)
    with any_app.partitions.admin.session() as s:
        for h, _ in hk.moving(s, f"audit-anchor:{any_app.records.instance}"):
            hk.destroy_moving(s, h)
    assert _moving_anchors(any_app) == []
    _events(any_app, 2)
    with any_app.store.engine.connect() as conn:
        head = conn.execute(select(st.audit_head)).one()
    slot = any_app.audit.anchor().slots.name()
    assert _moving_anchors(any_app) == [
        f"audit-anchor:{any_app.records.instance}@{slot}@5:{head.hash}".encode()]
    assert any_app.audit.verify().intact


def test_a_fixed_anchor_beyond_the_head_still_counts(any_app):
    """Anchors written before they moved (and the form a restore writes back) are read as
    well: one beyond the chain's head means the chain was cut, and the append is refused."""
    import pytest

    from keysvc.audit.anchor import Anchor
    from keysvc.errors import KeysvcError
    from keysvc.hsm import keys as hk
    _events(any_app)
    with any_app.partitions.admin.session() as s:
        hk.put_data(s, f"audit-anchor:{any_app.records.instance}", Anchor(9, "ab" * 32).encode())
    with pytest.raises(KeysvcError) as info:
        _events(any_app, 1)
    assert info.value.code == "AUDIT_UNAVAILABLE" and "HSM anchor" in info.value.message
    assert "HSM anchor" in any_app.audit.verify().detail


def test_verifying_while_events_are_appended_raises_no_alarm(any_app, monkeypatch):
    from keysvc.audit.anchor import ChainAnchor
    _events(any_app)
    real = ChainAnchor.read

    import threading
    appended = []

    def then_two_more(self):
        found = real(self)
        if threading.current_thread() is threading.main_thread() and not appended:
            appended.append(True)
            _events(any_app, 2)  # committed and anchored while verify reads on
        return found
    monkeypatch.setattr(ChainAnchor, "read", then_two_more)
    assert any_app.audit.verify().intact


def test_a_held_audit_head_fails_the_append_closed_within_the_timeout(any_app):
    """Another writer holds the chain (an outside lock): the event is not kept, so the
    caller is told AUDIT_UNAVAILABLE after the timeout, not left waiting or told OK."""
    import time

    import pytest

    from keysvc.errors import KeysvcError
    _events(any_app, 1)
    any_app.audit.writer.timeout = 1.0
    raw = any_app.store.engine.raw_connection()
    cur = raw.cursor()
    if any_app.store.is_sqlite:
        raw.driver_connection.isolation_level = None
        cur.execute("BEGIN IMMEDIATE")
    else:
        cur.execute("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE")
    try:
        started = time.monotonic()
        with pytest.raises(KeysvcError) as info:
            _events(any_app, 1)
        assert info.value.code == "AUDIT_UNAVAILABLE"
        assert time.monotonic() - started < 5
        assert not any_app.audit.healthy()
    finally:
        raw.rollback() if not any_app.store.is_sqlite else cur.execute("ROLLBACK")
        raw.close()
    any_app.audit.writer.timeout = 30.0
    _events(any_app, 1)
    assert any_app.audit.healthy() and any_app.audit.verify().intact


def test_reordered_events_are_found(any_app):
    events = _events(any_app)
    with any_app.store.tx() as conn:
        conn.execute(update(st.audit_events).where(st.audit_events.c.id == events[1].id)
                     .values(seq=-1))
        conn.execute(update(st.audit_events).where(st.audit_events.c.id == events[3].id)
                     .values(seq=2))
        conn.execute(update(st.audit_events).where(st.audit_events.c.id == events[1].id)
                     .values(seq=4))
    v = any_app.audit.verify()
    assert not v.intact and v.first_bad_event_id == events[3].id


def test_a_rewritten_chain_without_the_hsm_key_fails_its_mac(any_app):
    """Recomputing the hashes is not enough: the MAC key never leaves the HSM."""
    import hashlib

    from keysvc.audit.chain import canonical as _canonical
    from keysvc.audit.chain import row_event as _row_event
    events = _events(any_app, 3)
    with any_app.store.tx() as conn:
        rows = conn.execute(select(st.audit_events).order_by(st.audit_events.c.seq)).all()
        prev = "0" * 64
        for r in rows:
            e = _row_event(r)
            if r.id == events[1].id:
                e = e.__class__(**{**e.__dict__, "actor": "forger"})
            digest = hashlib.sha256(_canonical(r.seq, e, prev)).hexdigest()
            conn.execute(update(st.audit_events).where(st.audit_events.c.seq == r.seq)
                         .values(actor=e.actor, prev_hash=prev, hash=digest))
            prev = digest
        conn.execute(text("UPDATE audit_head SET hash = :h"), {"h": prev})
    v = any_app.audit.verify()
    assert not v.intact and v.first_bad_event_id == events[1].id


def test_list_audit_events_pages_and_filters(server):
    officer = server.as_("security-officer-2").admin
    for _ in range(5):
        officer.ListKeys(pb.ListKeysRequest())
    audit = server.as_("auditor").audit
    seen, token = [], ""
    while True:
        page = audit.ListAuditEvents(pb.ListAuditEventsRequest(
            actor="security-officer-2", action="keysvc.v1.KeyAdministrationService/ListKeys",
            page_size=2, page_token=token))
        assert len(page.events) <= 2
        seen += list(page.events)
        token = page.next_page_token
        if not token:
            break
    assert len(seen) >= 5
    assert all(e.actor == "security-officer-2" and e.outcome == "OK" for e in seen)
    assert [e.sequence for e in seen] == sorted(e.sequence for e in seen)


def test_security_officers_may_read_the_audit_log_and_s1sp_may_not(server):
    import grpc
    import pytest

    from keysvc.client import error_reason
    server.as_("security-officer-1").audit.VerifyAuditLog(pb.VerifyAuditLogRequest())
    with pytest.raises(grpc.RpcError) as info:
        server.as_("s1sp").audit.VerifyAuditLog(pb.VerifyAuditLogRequest())
    assert error_reason(info.value) == "ROLE_NOT_PERMITTED"


# --------------------------------------------------------------------------- from review
def _intent_row(app, event_text: str, mac: str = "00" * 32, intent_id: str | None = None):
    import datetime as dt
    import json
    import uuid

    from keysvc import store as st
    intent_id = intent_id or str(uuid.uuid4())
    with app.store.tx() as conn:
        conn.execute(st.audit_intents.insert().values(
            id=intent_id, created_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1),
            event=json.dumps({"event": event_text, "mac": mac})))
    return intent_id


def test_an_intent_added_in_the_database_is_not_chained_as_a_call(any_app):
    import datetime as dt

    from keysvc.audit.chain import AuditEvent, event_json
    forged = AuditEvent(id="forged-1", time=dt.datetime.now(dt.timezone.utc),
                        actor="security-officer-2", role="security-officer",
                        action="keysvc.v1.KeyAdministrationService/ApproveOperation",
                        target="op-x", outcome="OK", code="OK")
    _intent_row(any_app, event_json(forged), intent_id="forged-1")
    _intent_row(any_app, "not json at all", intent_id="garbage-1")
    assert any_app.audit.recover_intents() == 2
    events, _ = any_app.audit.list(page_size=1000)
    assert not any(e.action.endswith("ApproveOperation") for e in events)
    assert sorted(e.target.split()[1] for e in events if e.action == "audit.intent_forged") \
        == ["forged-1", "garbage-1"]
    assert any_app.audit.verify().intact


def test_a_sealed_intent_left_by_a_crash_is_chained_beside_a_bad_one(any_app):
    import datetime as dt
    import json

    from keysvc.audit.chain import AuditEvent, event_json
    real = AuditEvent(id="real-1", time=dt.datetime.now(dt.timezone.utc), actor="o", role="r",
                      action="keysvc.v1.KeyAdministrationService/CreateImportJob",
                      target="job", outcome="OK", code="OK")
    text = event_json(real)
    _intent_row(any_app, text, any_app.audit.intent_mac(text), intent_id="real-1")
    bad = json.loads(text) | {"id": "bad-1", "actor": 5}
    _intent_row(any_app, json.dumps(bad), intent_id="bad-1")
    any_app.audit.recover_intents()
    events, _ = any_app.audit.list(page_size=1000)
    assert [e.id for e in events if e.action.endswith("CreateImportJob")] == ["real-1"]
    assert any(e.action == "audit.intent_forged" for e in events)


def test_a_replica_reads_the_anchor_afresh_and_refuses_a_tail_another_replica_lost(any_app):
    """Replica B's events are deleted and the head set back to replica A's last event: A's
    next append finds the anchor B left, and refuses to chain over the gap."""
    import pytest

    from keysvc.errors import KeysvcError
    other = _reopened(any_app)
    a = _events(any_app, 2)
    _events(other, 5)
    _cut_the_end(any_app, a, keep=a[-1].sequence)
    with pytest.raises(KeysvcError) as info:
        _events(any_app, 1)
    assert info.value.code == "AUDIT_UNAVAILABLE" and "HSM anchor" in info.value.message


def test_a_malformed_event_row_is_named_by_verify_not_an_internal_error(any_app):
    events = _events(any_app)
    if not any_app.store.is_sqlite:
        import pytest
        pytest.skip("PostgreSQL refuses a value of another type itself")
    with any_app.store.engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET time = 'not a date' WHERE id = :i"),
                     {"i": events[2].id})
    v = any_app.audit.verify()
    assert not v.intact and v.first_bad_event_id == events[2].id
    listed, _ = any_app.audit.list(page_size=1000)
    assert len(listed) == 5


def test_the_audit_file_keeps_its_count_and_says_where_it_begins(any_app, tmp_path):
    """Rotation keeps `keep` files and marks what it let go; a file removed by hand is
    found (the files then begin at a sequence nothing explains)."""
    from keysvc.audit.sinks import JsonlSink, files_of
    any_app.audit._sinks = [JsonlSink(tmp_path / "a.jsonl", max_bytes=2000, keep=3)]
    _events(any_app, 40)
    assert len(files_of(tmp_path / "a.jsonl")) == 3
    assert any_app.audit.verify(sink=tmp_path / "a.jsonl").intact
    files_of(tmp_path / "a.jsonl")[0].unlink()
    v = any_app.audit.verify(sink=tmp_path / "a.jsonl")
    assert not v.intact and "begin at sequence" in v.detail


def test_a_line_in_the_audit_file_claiming_a_later_sequence_silences_nothing(any_app, tmp_path):
    from keysvc.audit.sinks import JsonlSink, read_lines
    path = tmp_path / "b.jsonl"
    _events(any_app, 1)
    path.write_text('[]\n{"seq": 1000000000}\n')
    any_app.audit._sinks = [JsonlSink(path)]
    new = _events(any_app, 2)
    assert {x.get("id") for x in read_lines(path)} >= {e.id for e in new}


def test_a_sink_that_fails_after_the_commit_does_not_wedge_the_writer(any_app, monkeypatch):
    import pytest

    from keysvc.audit.sinks import JsonlSink, SinkError
    from keysvc.errors import KeysvcError
    _events(any_app, 1)
    sink = any_app.audit.sinks()[0]
    real = JsonlSink.write
    monkeypatch.setattr(JsonlSink, "write", lambda self, lines: (_ for _ in ()).throw(
        SinkError("disk full")))
    with pytest.raises(KeysvcError):
        _events(any_app, 1)
    monkeypatch.setattr(JsonlSink, "write", real)
    _events(any_app, 2)  # works again at once; the missed event is filled in from the chain
    assert any_app.audit.healthy() and any_app.audit.verify(sink=sink.path).intact


def test_a_replica_cannot_chain_one_batch_over_a_tail_cut_from_another(any_app):
    """Replica B's anchor lies inside replica A's next batch after a cut: the batch's
    sequences are A's, the anchor's hash is B's, and A refuses."""
    import datetime as dt
    import uuid

    import pytest

    from keysvc.audit.chain import AuditEvent
    from keysvc.errors import KeysvcError
    other = _reopened(any_app)
    a = _events(any_app, 2)
    _events(other, 5)
    _cut_the_end(any_app, a, keep=a[-1].sequence)
    batch = [AuditEvent(id=str(uuid.uuid4()), time=dt.datetime.now(dt.timezone.utc),
                        actor="a", role="r", action="x", target=str(i), outcome="OK", code="OK")
             for i in range(6)]
    with pytest.raises(KeysvcError) as info:
        any_app.audit.writer.submit(batch)
    assert "HSM anchor" in info.value.message
    assert not any_app.audit.verify().intact


def test_a_row_added_beyond_the_head_neither_hides_an_intent_nor_passes_verify(any_app):
    """A database writer adds an audit row with a real intent's id far beyond the head:
    the intent is still chained, and verify names the row."""
    import datetime as dt

    from keysvc.audit.chain import AuditEvent, event_json
    _events(any_app, 2)
    real = AuditEvent(id="real-2", time=dt.datetime.now(dt.timezone.utc), actor="o", role="r",
                      action="keysvc.v1.KeyAdministrationService/CreateImportJob",
                      target="job", outcome="OK", code="OK")
    text_ = event_json(real)
    _intent_row(any_app, text_, any_app.audit.intent_mac(text_), intent_id="real-2")
    with any_app.store.tx() as conn:
        conn.execute(st.audit_events.insert().values(
            seq=10 ** 9, id="real-2", time=real.time, actor="x", role="x", action="x",
            target="x", outcome="OK", code="OK", prev_hash="0" * 64, hash="0" * 64,
            mac="0" * 64))
    v = any_app.audit.verify()
    assert not v.intact and "beyond the head" in v.detail
    with any_app.store.tx() as conn:
        conn.execute(st.audit_events.delete().where(st.audit_events.c.seq == 10 ** 9))
    any_app.audit.recover_intents()
    events, _ = any_app.audit.list(page_size=1000)
    assert "real-2" in {e.id for e in events}


def test_an_intent_row_renamed_to_a_chained_events_id_is_still_chained(any_app):
    import datetime as dt

    from keysvc.audit.chain import AuditEvent, event_json
    chained = _events(any_app, 2)
    real = AuditEvent(id="real-3", time=dt.datetime.now(dt.timezone.utc), actor="o", role="r",
                      action="keysvc.v1.KeyAdministrationService/CreateImportJob",
                      target="job", outcome="OK", code="OK")
    text_ = event_json(real)
    _intent_row(any_app, text_, any_app.audit.intent_mac(text_), intent_id=chained[0].id)
    any_app.audit.recover_intents()
    events, _ = any_app.audit.list(page_size=1000)
    assert "real-3" in {e.id for e in events}
    assert any(e.action == "audit.intent_forged" for e in events)
    assert any_app.audit.verify().intact


def test_every_anchor_counts_not_only_the_highest(any_app):
    """An event cut from the chain and a batch of another replica over its place: the
    older anchor still names the event that was there."""
    import pytest

    from keysvc.errors import KeysvcError
    other = _reopened(any_app)
    a = _events(any_app, 3)
    _cut_the_end(any_app, a, keep=2)
    with pytest.raises(KeysvcError):
        other.audit.writer.submit([_event_for(i) for i in range(2)])
    assert not any_app.audit.verify().intact


def _event_for(i: int):
    import datetime as dt
    import uuid

    from keysvc.audit.chain import AuditEvent
    return AuditEvent(id=str(uuid.uuid4()), time=dt.datetime.now(dt.timezone.utc), actor="b",
                      role="r", action="x", target=str(i), outcome="OK", code="OK")


# Group commit (issue 18): a batch waits, at most audit_commit_delay_ms, for the events of
# calls still at work, so that calls arriving together share one batch.
def test_a_batch_waits_for_the_event_of_a_call_still_at_work(app):
    import threading
    import time
    w = app.audit.writer
    w.timeout, w.commit_delay = 30.0, 10.0
    _events(app, 1)  # the writer started
    before = w.batches
    work = w.working()
    first: list = []
    t = threading.Thread(target=lambda: first.extend(_events(app, 1)))
    t.start()
    time.sleep(0.3)
    assert not first  # its batch waits for the call at work
    [mine] = w.submit([app.audit.call("dco", "dco", "keysvc.v1.DCOService/VerifyMasterKey",
                                      lambda: "x").event("OK", "OK")], work=work)
    t.join(30)
    assert w.batches - before == 1  # one batch for both
    assert mine.sequence == first[0].sequence + 1


def test_a_lone_call_waits_for_no_other(app):
    """No call at work: the batch goes at once, though the delay is longer than a caller
    waits (else this append would fail closed)."""
    w = app.audit.writer
    w.timeout, w.commit_delay = 5.0, 60.0
    assert _events(app, 2)
    assert app.audit.verify().intact


def test_a_batch_waits_no_longer_than_the_commit_delay(app):
    """A call at work that never ends (a large file, a stuck HSM call) holds no batch
    longer than the delay."""
    w = app.audit.writer
    w.timeout, w.commit_delay = 5.0, 0.5
    with w.working():
        assert _events(app, 2)
    assert app.audit.verify().intact


def test_a_long_call_at_work_holds_no_batch(app):
    """A migration file or a verification of the trail (`working(counted=False)`, as the
    server does for them) is at work for seconds to minutes: no batch waits for it, though
    the delay is longer than a caller waits (review 2, session 18)."""
    w = app.audit.writer
    w.timeout, w.commit_delay = 5.0, 60.0
    with w.working(counted=False):
        assert _events(app, 2)
    assert app.audit.verify().intact


def test_a_call_at_work_that_chains_an_event_of_its_own_does_not_wait_for_itself(app):
    """An event a call chains before its end (a ceremony's step, a seal failure) is waited
    for by the call itself: its batch does not wait for that call to finish its work (with
    a delay longer than a caller waits, it would fail closed)."""
    from keysvc.audit.writer import at_work
    w = app.audit.writer
    w.timeout, w.commit_delay = 5.0, 60.0
    with w.working() as work:
        mine = at_work.set(work)
        try:
            assert _events(app, 2)
        finally:
            at_work.reset(mine)
    assert app.audit.verify().intact
