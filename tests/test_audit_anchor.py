"""The moving audit anchor (keysvc/audit/anchor.py): each writer moves one object of its
own slot, only forward, and never touches another live writer's. These rules are review
10's attacks, which once succeeded."""
from __future__ import annotations

import os
import uuid

import pytest
from pkcs11 import ObjectClass
from sqlalchemy import select, update

from keysvc import store as st
from keysvc.audit.anchor import FIXED_KEPT, Anchor, ChainAnchor, ChainRefused, SlotLock, fixed_form
from keysvc.audit.chain import AuditEvent
from keysvc.errors import KeysvcError
from keysvc.hsm import keys as hk
from keysvc.hsm.direct import Template
from tests.test_audit import _cut_the_end, _events, _reopened

HASH = "ab" * 32


def _label(app) -> str:
    return f"audit-anchor:{app.records.instance}"


def _row_hash(app, seq: int) -> str:
    with app.store.engine.connect() as conn:
        return conn.execute(select(st.audit_events.c.hash)
                            .where(st.audit_events.c.seq == seq)).scalar()


def _set_hash(app, seq: int, value: str) -> None:
    with app.store.tx() as conn:
        conn.execute(update(st.audit_events).where(st.audit_events.c.seq == seq)
                     .values(hash=value))


def _head(app):
    with app.store.engine.connect() as conn:
        return conn.execute(select(st.audit_head)).one()


def _objects(app, application: str | None = None) -> list[tuple[int, str]]:
    with app.partitions.admin.session() as s:
        return [(h, lbl.decode()) for h, lbl in hk.moving(s, application or _label(app))]


def _refused(call) -> str:
    with pytest.raises(KeysvcError) as info:
        call()
    assert info.value.code == "AUDIT_UNAVAILABLE"
    return info.value.message


def _event(app) -> AuditEvent:
    return AuditEvent(id=str(uuid.uuid4()), time=app.audit.clock(), actor="officer-b",
                      role="security-officer", action="keysvc.v1.Test/B", target="",
                      outcome="OK", code="")


def _cleanup(app, application: str) -> None:
    with app.partitions.admin.session() as s:
        for h, _ in hk.moving(s, application):
            hk.destroy_moving(s, h)


def test_a_refused_batch_never_lets_the_writer_start_below_what_it_anchored(app):
    """Row 6 (B's anchor, below the head) made to look wrong refuses A's batch 8..10 after
    it is anchored; the attacker then repairs row 6 and cuts 8..10. A's next batch is
    refused (its anchor says 10), and the token still says 10."""
    a, b, c = app, _reopened(app), _reopened(app)
    _events(a, 5)
    _events(b, 1)                                     # B@6: A has not matched it yet
    _events(c, 1)                                     # C@7, the head
    good6 = _row_hash(a, 6)
    _set_hash(a, 6, "00" * 32)
    assert "sequence 6" in _refused(lambda: a.audit.writer.submit(
        [_event(a) for _ in range(3)]))
    assert _head(a).seq == 10
    _set_hash(a, 6, good6)
    _cut_the_end(a, None, keep=7)
    assert "HSM anchor says 10" in _refused(lambda: _events(a, 2))
    assert a.audit.anchor().read().seq == 10
    assert "HSM anchor has sequence 10" in a.audit.verify(sink=None).detail


def test_a_wrong_anchor_refuses_the_next_batch_before_it_commits(app):
    """Until the chain holds it again, an anchor found wrong is checked before anything
    more is chained: the refused writer adds no events."""
    a, b, c = app, _reopened(app), _reopened(app)
    _events(a, 2)
    _events(b, 1)
    _events(c, 1)
    _set_hash(a, 3, "00" * 32)
    _refused(lambda: _events(a, 1))                   # chained 5, then refused
    _refused(lambda: _events(a, 1))                   # refused before chaining 6
    assert _head(a).seq == 5


@pytest.mark.parametrize("edit", ["hash", "ahead", "beyond"])
def test_an_audit_head_that_is_not_the_last_event_is_refused_before_anything_is_chained(
        app, edit):
    """Another hash at the head's sequence (chaining on would fork the chain, and
    VerifyAuditLog would name this writer's own event), a head ahead of the events, or an
    event beyond the head."""
    _events(app, 3)
    if edit == "hash":
        _set_head(app, 3, "cd" * 32)
    elif edit == "ahead":
        _set_head(app, 10**12, "cd" * 32)
    else:
        _set_head(app, 2, _row_hash(app, 2))
    assert "not the chain's last event" in _refused(lambda: _events(app, 1))
    with app.store.engine.connect() as conn:
        assert conn.execute(select(st.audit_events.c.seq).order_by(
            st.audit_events.c.seq.desc())).first()[0] == 3


def test_a_writer_never_destroys_another_writers_anchor(app, monkeypatch):
    """Pruning (here of fixed anchors restores left) destroys fixed anchors and extras of
    the writer's own slot only: another writer may be moving its object at that moment."""
    a, b = app, _reopened(app)
    _events(a, 2)
    _events(b, 1)
    [(b_handle, _)] = [(h, lbl) for h, lbl in _objects(a)
                       if f"@{b.audit.anchor().slots.name()}@" in lbl]
    with a.partitions.admin.session() as s:
        for _ in range(FIXED_KEPT + 1):
            hk.put_data(s, _label(a), Anchor(1, _row_hash(a, 1)).encode())
    destroyed: list[int] = []
    real = hk.destroy_moving
    monkeypatch.setattr(hk, "destroy_moving", lambda s, h: (destroyed.append(h), real(s, h)))
    _events(a, 1)
    assert b_handle not in destroyed and b_handle in dict(_objects(a))
    with a.partitions.admin.session() as s:
        assert hk.data_values(s, _label(a)) == []      # the fixed ones are pruned
    _events(b, 1)
    assert a.audit.verify().intact


def test_a_kept_handle_that_names_another_object_is_not_moved(app):
    """A kept handle is checked before the move: on an HSM that reuses handles, it could
    name another object (here a key), which keeps its label; the writer finds its own."""
    _events(app, 1)
    key_label = f"victim-{uuid.uuid4().hex[:8]}"
    with app.partitions.admin.session() as s:
        hk.generate_aes(s, key_label)
        [kh] = s.direct.find_objects(s.raw.handle, Template(
            {hk.A.CLASS: ObjectClass.SECRET_KEY, hk.A.LABEL: key_label}))
    app.audit.anchor()._mine = (app.partitions.admin.generation, kh)
    try:
        _events(app, 1)
        with app.partitions.admin.session() as s:
            assert s.direct.attribute(s.raw.handle, kh, hk.A.LABEL) == key_label.encode()
        assert len(_objects(app)) == 1 and app.audit.anchor().read().seq == 2
    finally:
        with app.partitions.admin.session() as s:
            s.direct.destroy_object(s.raw.handle, kh)


def test_an_instance_id_with_an_at_sign_finds_its_own_anchor(app, tmp_path):
    application = f"audit-anchor:x@{uuid.uuid4().hex[:8]}"
    anchor = ChainAnchor(app.partitions.admin, application.removeprefix("audit-anchor:"),
                         tmp_path)
    try:
        for seq in (1, 2, 3):
            anchor.write(Anchor(seq, HASH))
        assert len(_objects(app, application)) == 1 and anchor.read() == Anchor(3, HASH)
        assert fixed_form(_objects(app, application)[0][1], b"") == (
            application, Anchor(3, HASH).encode())
    finally:
        _cleanup(app, application)


def test_a_module_reinitialise_finds_the_writers_own_anchor_again(app):
    _events(app, 1)
    for _ in range(4):
        app.partitions.admin.refresh()
        _events(app, 1)
    assert len(_objects(app)) == 1 and app.audit.anchor().read().seq == 5


def test_a_restarted_writer_adopts_its_slots_anchor_and_moves_it_only_forward(app, tmp_path):
    """One state directory leaves at most one object per process it runs at once."""
    instance = uuid.uuid4().hex
    application = "audit-anchor:" + instance
    try:
        first = ChainAnchor(app.partitions.admin, instance, tmp_path)
        first.write(Anchor(5, HASH))
        slot = first.slots.name()
        first.slots.release()                          # the process ended
        again = ChainAnchor(app.partitions.admin, instance, tmp_path)
        again.write(Anchor(6, HASH))
        assert again.slots.name() == slot
        assert [lbl for _, lbl in _objects(app, application)] == [
            f"{application}@{slot}@6:{HASH}"]
        again.slots.release()
        behind = ChainAnchor(app.partitions.admin, instance, tmp_path)
        with pytest.raises(ChainRefused):
            behind.write(Anchor(4, HASH))
        assert behind.read() == Anchor(6, HASH)
        other = ChainAnchor(app.partitions.admin, instance, tmp_path)
        assert other.slots.name() != behind.slots.name()   # slot held: the next one
    finally:
        _cleanup(app, application)


def test_a_writer_never_moves_its_own_anchor_back(app, tmp_path):
    instance = uuid.uuid4().hex
    anchor = ChainAnchor(app.partitions.admin, instance, tmp_path)
    try:
        anchor.write(Anchor(7, HASH))
        with pytest.raises(ChainRefused):
            anchor.write(Anchor(7, "cd" * 32))
        assert anchor.read() == Anchor(7, HASH)
    finally:
        _cleanup(app, "audit-anchor:" + instance)


def test_labels_and_values_that_name_no_anchor_are_ignored(app):
    """Only a PIN holder can write them, but none ends in an exception: other instances,
    no slot, malformed digests, sequences past 63 bits, a value of the wrong length."""
    _events(app, 2)
    lbl = _label(app)
    with app.partitions.admin.session() as s:
        for text in (f"audit-anchor:{uuid.uuid4().hex}@h.0@99:{HASH}",
                     f"{lbl}@{'9' * 5000}:{HASH}", f"{lbl}@h.0@{2**63}:{HASH}",
                     f"{lbl}@h.0@7:{'zz' * 32}", f"{lbl}@h.0@-1:{HASH}", f"{lbl}@",
                     f"{lbl}@@1:{HASH}", lbl):
            hk.put_moving(s, lbl, text)
        hk.put_data(s, lbl, b"short")
        hk.put_data(s, lbl, (2**64 - 1).to_bytes(8, "big") + bytes(32))
    try:
        assert app.audit.anchor().read().seq == 2
        _events(app, 1)
        assert app.audit.verify().intact
        with app.partitions.admin.session() as s:
            hk.put_moving(s, lbl, f"{lbl}@h.0@{2**62}:{HASH}")
        assert "HSM anchor" in _refused(lambda: _events(app, 1))
        assert "HSM anchor has sequence" in app.audit.verify().detail
    finally:
        _cleanup(app, lbl)
        with app.partitions.admin.session() as s:
            hk.destroy_data(s, lbl)


def test_fixed_form_splits_the_label_from_the_right():
    assert fixed_form(f"audit-anchor:i@h.0@12:{HASH}", b"") == (
        "audit-anchor:i", Anchor(12, HASH).encode())
    assert fixed_form(f"audit-anchor:i@x@h.0@12:{HASH}", b"") == (
        "audit-anchor:i@x", Anchor(12, HASH).encode())
    assert fixed_form(f"audit-anchor:i@h.0@{2**64}:{HASH}", b"v") == (
        f"audit-anchor:i@h.0@{2**64}:{HASH}", b"v")
    assert fixed_form("audit-anchor:i", b"x") == ("audit-anchor:i", b"x")
    assert fixed_form("rec:i:key/x", b"v") == ("rec:i:key/x", b"v")


def test_a_cut_below_another_writers_anchor_is_refused_and_found(app):
    a, b = app, _reopened(app)
    _events(a, 3)
    _events(b, 2)
    _cut_the_end(a, None, keep=3)
    assert "HSM anchor" in _refused(lambda: _events(a, 1))
    assert "HSM anchor has sequence 5" in a.audit.verify(sink=None).detail


def test_an_anchor_destroyed_between_move_and_search_is_made_again(app, monkeypatch):
    """`audit new-chain` in another process destroys the writer's object meanwhile."""
    _events(app, 2)
    real, done = hk.moving, []

    def destroying(s, application):
        if not done:
            done.append(1)
            for h, _ in real(s, application):
                hk.destroy_moving(s, h)
        return real(s, application)
    monkeypatch.setattr(hk, "moving", destroying)
    _events(app, 1)
    assert app.audit.anchor().read().seq == 3 and app.audit.verify().intact


# --------------------------------------------------------------------------- slots
def _twin_dirs(tmp_path, ident="deadbeef" * 2):
    """Two state directories whose `id` says the same: a copied state directory."""
    out = []
    for name in ("d1", "d2"):
        d = tmp_path / name
        d.mkdir()
        (d / "id").write_text(ident)
        out.append(d)
    return out


def test_two_processes_sharing_a_slot_are_refused(app, tmp_path):
    """A writer moves its object only from the label it last wrote: one another process
    moved (a copied state directory, whose writers take the same slot names) is refused
    with what to do, not moved back."""
    instance = uuid.uuid4().hex
    x_dir, y_dir = _twin_dirs(tmp_path)
    x = ChainAnchor(app.partitions.admin, instance, x_dir)
    y = ChainAnchor(app.partitions.admin, instance, y_dir)
    try:
        assert x.slots.name() == y.slots.name()
        x.write(Anchor(4, HASH))
        y.write(Anchor(6, HASH))                       # adopts X's object (a "restart")
        with pytest.raises(ChainRefused, match="share the slot.*restart both"):
            x.write(Anchor(7, HASH))
        assert x.read() == Anchor(6, HASH)
    finally:
        x.slots.release(), y.slots.release()
        _cleanup(app, "audit-anchor:" + instance)


def test_prune_never_destroys_a_moving_anchor(app, tmp_path):
    """Not even one in the writer's own slot that it did not write (a shared slot), and
    not after a module re-initialise made the writer's kept handle stale."""
    _events(app, 3)
    with app.partitions.admin.session() as s:
        for _ in range(FIXED_KEPT + 1):
            hk.put_data(s, _label(app), Anchor(1, _row_hash(app, 1)).encode())
        hk.put_moving(s, _label(app), f"{_label(app)}@{app.audit.anchor().slots.name()}"
                                      f"@9:{HASH}")
    anchor = app.audit.anchor()
    real = type(anchor).prune

    def prune(self, newest, doomed):
        app.partitions.admin.refresh()                # another thread, at this moment
        return real(self, newest, doomed)
    type(anchor).prune = prune
    try:
        _refused(lambda: _events(app, 1))             # 9 is beyond the head: refused
    finally:
        type(anchor).prune = real
    assert len(_objects(app)) == 2 and anchor.read().seq == 9
    with app.partitions.admin.session() as s:
        assert len(hk.data_values(s, _label(app))) == FIXED_KEPT + 1
    _cleanup(app, _label(app))


def test_fixed_anchors_beyond_those_kept_are_pruned_and_the_writers_object_stays(app):
    _events(app, 3)
    with app.partitions.admin.session() as s:
        for _ in range(FIXED_KEPT + 1):
            hk.put_data(s, _label(app), Anchor(1, _row_hash(app, 1)).encode())
    anchor = app.audit.anchor()
    real = type(anchor).prune

    def prune(self, newest, doomed):
        app.partitions.admin.refresh()                # the kept handle goes stale
        return real(self, newest, doomed)
    type(anchor).prune = prune
    try:
        _events(app, 1)
    finally:
        type(anchor).prune = real
    with app.partitions.admin.session() as s:
        assert hk.data_values(s, _label(app)) == []
    assert len(_objects(app)) == 1 and anchor.read().seq == 4


@pytest.mark.parametrize("make", [os.mkfifo, os.mkdir,
                                  lambda p: os.symlink("/dev/zero", p)])
def test_a_lock_file_that_is_not_a_regular_file_refuses_before_anything_is_chained(
        app, tmp_path, make):
    """The state directory is a host file: a FIFO (which would block the writer for good),
    a directory or a link where a lock file should be refuses the batch, clearly, before
    its events are chained; once it is fixed, the writer works again."""
    _events(app, 2)
    slots = tmp_path / "slots"
    slots.mkdir()
    make(slots / "0.lock")
    app.audit.anchor().slots = SlotLock(slots)
    assert "0.lock" in _refused(lambda: _events(app, 1))
    assert _head(app).seq == 2
    if (slots / "0.lock").is_dir() and not (slots / "0.lock").is_symlink():
        (slots / "0.lock").rmdir()
    else:
        (slots / "0.lock").unlink()
    _events(app, 1)                                   # (the refused event is chained too)
    assert _head(app).seq == 4 and app.audit.verify().intact


def test_a_lock_file_replaced_while_held_refuses_every_batch(app, tmp_path):
    """Unlinked and made again, the lock file could be locked by a second process, which
    would take the same slot: the holder refuses, naming the file."""
    app.audit.anchor().slots = SlotLock(tmp_path)
    _events(app, 1)
    (tmp_path / "0.lock").unlink()
    (tmp_path / "0.lock").touch()
    assert "was replaced" in _refused(lambda: _events(app, 1))
    assert _head(app).seq == 1


def test_a_forked_child_takes_a_slot_of_its_own(tmp_path):
    lock = SlotLock(tmp_path)
    parent = lock.name()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(w, lock.name().encode())
        finally:
            os._exit(0)
    os.close(w)
    child = os.read(r, 200).decode()
    os.waitpid(pid, 0)
    assert child and child != parent and lock.name() == parent
    lock.release()


# --------------------------------------------------------------------------- review 12
def _set_head(app, seq, digest) -> None:
    with app.store.tx() as conn:
        conn.execute(update(st.audit_head).values(seq=seq, hash=digest))


@pytest.mark.parametrize("seq,digest", [(-50, "00" * 32), (2**62, "00" * 32), (3, "zz")])
def test_an_edited_head_that_is_no_chain_position_is_refused_before_anything_is_written(
        app, seq, digest):
    """Before the first anchor, too: nothing is chained and no token object is made."""
    _set_head(app, seq, digest)
    assert "is not a position in a chain" in _refused(
        lambda: app.audit.writer.submit([_event(app)]))
    assert _objects(app) == []
    with app.store.engine.connect() as conn:
        assert conn.execute(select(st.audit_events)).first() is None


def test_a_running_writer_follows_audit_new_chain(app):
    """`keysvc audit-new-chain` (a PIN holder) while a server runs: the server's writer
    sees its own object gone and follows the token, as a restarted one would; a
    database-only cut afterwards is refused again."""
    server, cli = app, _reopened(app)
    _events(server, 6)
    _cut_the_end(server, None, keep=3)
    assert "audit-new-chain" in _refused(lambda: _events(server, 1))
    cli.audit.new_chain("database restored (ticket 1)")
    _events(server, 2)
    _events(cli, 5)
    _events(server, 1)
    server.audit.sink_path.unlink()   # (it still holds what new-chain gave up, as it should)
    assert server.audit.verify().intact
    _cut_the_end(server, None, keep=_head(server).seq - 2)
    assert "HSM anchor" in _refused(lambda: _events(server, 1))


def test_a_closed_audit_log_gives_its_slot_back(app):
    """(App.close closes it.) Its lock file can be locked at once by another process (here:
    another open file)."""
    import fcntl
    _events(app, 1)
    slots = app.audit.anchor().slots
    n = slots.name().rsplit(".", 1)[1]
    app.audit.close()
    with open(slots.directory / f"{n}.lock", "ab") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_forked_writer_moves_an_object_of_its_own_slot(app, tmp_path, monkeypatch):
    """After a fork the child takes its own slot, and adopts that slot's object as a new
    process would (never compares it with the parent's label)."""
    from keysvc.audit import anchor as anchor_mod
    instance = uuid.uuid4().hex
    application = "audit-anchor:" + instance
    a = ChainAnchor(app.partitions.admin, instance, tmp_path)
    try:
        parent_slot = a.slots.name()
        nxt = f"{parent_slot.rsplit('.', 1)[0]}.{int(parent_slot.rsplit('.', 1)[1]) + 1}"
        with app.partitions.admin.session() as s:       # left by an earlier process
            hk.put_moving(s, application, f"{application}@{nxt}@2:{HASH}")
        a.write(Anchor(5, HASH))
        keep = os.dup(a.slots._held[2].fileno())        # the parent still holds its lock
        real = os.getpid()
        monkeypatch.setattr(anchor_mod.os, "getpid", lambda: real + 1)
        a.write(Anchor(6, HASH))
        assert a.slots.name() == nxt and len(_objects(app, application)) == 2
        os.close(keep)
    finally:
        monkeypatch.undo()
        a.slots.release()
        _cleanup(app, application)


def test_a_state_directory_id_is_64_random_bits(tmp_path):
    lock = SlotLock(tmp_path)
    ident, n = lock.name().rsplit(".", 1)
    assert len(ident) == 16 and int(ident, 16) >= 0 and n == "0"
    lock.release()
