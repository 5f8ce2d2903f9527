"""AuditService: events hash-chained and MACed in the HSM; tampering is found and named."""
from __future__ import annotations

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


def test_the_token_holds_one_anchor_per_database_its_newest(any_app):
    from keysvc.audit.anchor import Anchor
    from hsm import keys as hk
    _events(any_app)
    with any_app.partitions.admin.session() as s:
        (value,) = hk.data_values(s, f"audit-anchor:{any_app.records.instance}")
    with any_app.store.engine.connect() as conn:
        head = conn.execute(select(st.audit_head)).one()
    assert Anchor.decode(value) == Anchor(5, head.hash)


def test_verifying_while_events_are_appended_raises_no_alarm(any_app, monkeypatch):
    from keysvc.audit.anchor import ChainAnchor
    _events(any_app)
    real = ChainAnchor.read

    def then_two_more(self):
        found = real(self)
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
    from keysvc.audit.chain import canonical as _canonical, row_event as _row_event
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
