"""The HSM's word on how long the audit chain is.

After every batch of events commits, its last sequence and hash are written into the admin
token, where nobody with the database can move them back. So a suppressed insert, a deleted
tail, a deleted head or an erased log leaves a chain shorter than, or different from, what
the token holds: VerifyAuditLog says so, and the writer refuses to append to such a chain
(it never silently starts a new one; an operator who must continue says so with
`keysvc audit new-chain`, itself an event).

Each writer (a server process) keeps one anchor object of its own and moves it forward:
its label `audit-anchor:<database instance>@<slot>@<sequence>:<hash>` is rewritten after
every batch, and its CKA_APPLICATION `audit-anchor:<database instance>`, fixed at
creation, is how it is found. Only a holder of the token's PIN can change it, as before.
Why not a new object per batch (as until session 10): creating a token object took 2 ms
of every batch's 12 ms under load, with the whole HSM waiting (bench/bench_cores.py), and
a re-index of the token in every process; rewriting a label takes 0.16 ms. The highest
anchor of all the writers counts.

Why slots: a writer may destroy or move only its own object, never another live writer's
(PKCS#11 has no compare-and-set: an object read at 5 may be at 12 by the time it is
destroyed, and the token would hold less than the chain). A slot is `<host>.<state
directory id>.<n>`, held with a lock file in the state directory for the life of the
process; a restarted process takes a free slot and adopts that slot's object, moving it
only forward. So one state directory leaves at most as many objects as it ever ran
processes at once; objects of other state directories stay (a writer cannot know whether
their writers are alive) until `keysvc audit new-chain` replaces them all.

Anchors written before (label `audit-anchor:<instance>`, the anchor in CKA_VALUE) still
count until they are pruned, and a backup carries every anchor in that fixed form
(`fixed_form`), which a restore writes back.
"""
from __future__ import annotations

import fcntl
import os
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from keysvc.hsm import HsmOperationFailed, Token
from keysvc.hsm import keys as hk
from keysvc.hsm.token import Session

LABEL = "audit-anchor:"
LEGACY_CHECKPOINT = "audit-checkpoint:"   # before issue 14: a copy every few seconds


MAX_SEQ = 2**63 - 1   # what a fixed anchor's 8 bytes and the database's BIGINT hold
MAX_SLOTS = 1024      # writer processes one state directory may run at once
# Fixed anchors (older kinds, and those a restore writes back) are pruned in bulk once there
# are more than this many; each is matched against the chain when it is first seen.
FIXED_KEPT = 8


class ChainRefused(Exception):
    """The database chain is behind or unlike the HSM anchor, or does not keep what is
    written: the batch is refused, and its callers are told why."""


@dataclass(frozen=True)
class Anchor:
    seq: int
    hash: str

    def encode(self) -> bytes:
        return self.seq.to_bytes(8, "big") + bytes.fromhex(self.hash)

    @classmethod
    def decode(cls, value: bytes) -> "Anchor | None":
        """A fixed anchor's value, or None if it is not one (only a PIN holder could have
        written such a value)."""
        if len(value) != 40 or int.from_bytes(value[:8], "big") > MAX_SEQ:
            return None
        return cls(int.from_bytes(value[:8], "big"), value[8:40].hex())

    def text(self) -> str:
        return f"{self.seq}:{self.hash}"

    @classmethod
    def parse(cls, text: str) -> "Anchor | None":
        """The anchor a moving object's label names after its last `@`, or None if it names
        none (only a PIN holder could have written such a label)."""
        seq, _, digest = text.partition(":")
        try:
            if len(digest) == 64 and seq.isdigit() and int(seq) <= MAX_SEQ:
                return cls(int(seq), bytes.fromhex(digest).hex())
        except ValueError:
            pass
        return None


def _split(rest: str) -> tuple[str, Anchor] | None:
    """(slot, anchor) from what follows `audit-anchor:<instance>@` in a moving label."""
    slot, _, text = rest.rpartition("@")
    anchor = Anchor.parse(text)
    if not slot or "@" in slot or anchor is None:
        return None
    return slot, anchor


def fixed_form(label: str, value: bytes) -> tuple[str, bytes]:
    """A data object as a backup carries it: a moving anchor becomes a fixed one (label
    `audit-anchor:<instance>`, the anchor in its value), which a restore can write back as
    it is; every other object is itself. (Split from the right: an instance may hold `@`,
    a slot and an anchor never do.)"""
    if label.startswith(LABEL):
        rest, _, text = label.rpartition("@")
        name, _, slot = rest.rpartition("@")
        anchor = Anchor.parse(text)
        if name.startswith(LABEL) and slot and anchor is not None:
            return name, anchor.encode()
    return label, value


@dataclass(frozen=True)
class Found:
    """An anchor in the token: a moving one has its handle and slot; a fixed one neither."""
    anchor: Anchor
    handle: int | None = None
    slot: str | None = None


class SlotLock:
    """This process's writer slot: the first of `<dir>/<n>.lock` it can lock. The lock is
    the kernel's (flock), so it is free again the moment its process ends, however, or
    this object is collected (its file closes).

    The state directory is a host file, not trusted: a lock file that is not a regular
    file is refused (never opened blocking, never followed), and one replaced while held
    (unlinked and made again, so that another process could lock the same name) refuses
    every batch from then on, since two writers moving one object could move it back."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._held: tuple[int, str, IO[bytes], Path] | None = None  # pid, name, file, path

    def name(self) -> str:
        held = self._held
        if held is not None and held[0] == os.getpid():
            if not _same_file(held[2], held[3]):
                raise ChainRefused(f"the lock file of audit anchor slot {held[1]} "
                                   f"({held[3]}) was replaced while this process held it: "
                                   "another process may share the slot; restart keysvc")
            return held[1]
        if held is not None:   # a forked child: the parent keeps its slot, the child its own
            held[2].close()
            self._held = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            prefix = self._directory_id()
            for n in range(MAX_SLOTS):
                path = self.directory / f"{n}.lock"
                f = _open_regular(path, os.O_RDWR | os.O_CREAT)
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    f.close()
                    continue
                self._held = (os.getpid(), f"{prefix}.{n}", f, path)
                return self._held[1]
        except OSError as exc:
            raise ChainRefused(f"audit anchor slot {exc.filename or self.directory} cannot "
                               f"be used: {exc.strerror or type(exc).__name__}") from None
        raise ChainRefused(f"all {MAX_SLOTS} audit anchor slots of {self.directory} are "
                           "held: too many writer processes on one state directory")

    def release(self) -> None:
        """Free the slot (a writer closing; a test standing for a process that ended)."""
        if self._held is not None:
            self._held[2].close()
            self._held = None

    def _directory_id(self) -> str:
        """A random name for this state directory, made once: two state directories on one
        host (sharing a database and a token) must not share slots. (A copied state
        directory shares it: its writers then refuse, and removing its `id` gives it its
        own. No host name in it: a container's changes at every start.)"""
        path = self.directory / "id"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(8))
        for _ in range(50):   # another process made it a moment ago and is writing it
            with _open_regular(path, os.O_RDONLY) as f:
                text = f.read(64).decode(errors="replace").strip()
            if len(text) == 16 and all(c in "0123456789abcdef" for c in text):
                return text
            time.sleep(0.01)
        raise ChainRefused(f"{path} does not hold a state directory id; remove it")


def _open_regular(path: Path, flags: int) -> IO[bytes]:
    """`path` opened without following a link or blocking (a FIFO), if a regular file."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ChainRefused(f"{path} is not a regular file")
    return os.fdopen(fd, "r+b" if flags & os.O_RDWR else "rb", buffering=0)


def _same_file(f: IO[bytes], path: Path) -> bool:
    try:
        now = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    held = os.fstat(f.fileno())
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _shared(slot: str) -> ChainRefused:
    return ChainRefused(f"another process moved this writer's audit anchor (slot {slot}): "
                        "two processes share the slot. Was the state directory copied? A "
                        "copy needs its own audit-anchor-slots/id (remove it there), then "
                        "restart both")


class ChainAnchor:
    def __init__(self, token: Token, instance: str, slots: Path) -> None:
        self.token = token
        self.label = LABEL + instance   # the search key: CKA_APPLICATION, or a fixed label
        self.slots = SlotLock(slots)
        self._mine: tuple[int, int] | None = None  # (module generation, handle) we move
        self._last: Anchor | None = None           # the last anchor this writer wrote
        self._written: str | None = None           # ... and the label it wrote it as
        self._pid = os.getpid()   # a forked child moves an object of its own slot
        self.prunable = False   # the last write saw more than FIXED_KEPT fixed anchors
        # `release` waits for a write under way: a slot freed in the middle of one would
        # let another process adopt the object this write is about to move.
        self._writing = threading.Lock()

    def read(self) -> Anchor | None:
        """The newest anchor (highest sequence), or None before the first batch."""
        return max(self.all(), key=lambda a: a.seq, default=None)

    def all(self) -> list[Anchor]:
        with self.token.session() as s:
            return [f.anchor for f in self._found(s)]

    def _found(self, s: Session) -> list[Found]:
        """Every anchor of this chain: the moving ones (with handle and slot), then the
        fixed ones. Objects whose label names no anchor are ignored."""
        out: list[Found] = []
        prefix = self.label + "@"
        for h, raw in hk.moving(s, self.label):
            label = raw.decode(errors="replace")
            parts = _split(label.removeprefix(prefix)) if label.startswith(prefix) else None
            if parts is not None:
                out.append(Found(parts[1], h, parts[0]))
        fixed = (Anchor.decode(v) for v in hk.data_values(s, self.label))
        return out + [Found(a) for a in fixed if a is not None]

    def write(self, anchor: Anchor) -> list[Anchor]:
        """Move this writer's anchor forward to `anchor` (made at its first batch, adopted
        from its slot's last process, or made again when it is gone); returns every anchor
        of the chain now in the token (another writer's beside it: the writer checks them).
        Never backwards: a chain that ends below what this writer anchored is refused."""
        with self._writing:
            return self._write(anchor)

    def _write(self, anchor: Anchor) -> list[Anchor]:
        if self._last is not None and anchor.seq <= self._last.seq:
            raise ChainRefused(f"the audit chain's new head {anchor.seq} is not past this "
                               f"writer's anchor at {self._last.seq}: events were cut")
        if Anchor.parse(anchor.text()) != anchor:
            raise ChainRefused(f"the audit chain's head {anchor.seq} is not a chain position")
        if self._pid != os.getpid():
            self._pid, self._mine, self._written = os.getpid(), None, None
        slot = self.slots.name()
        label = f"{self.label}@{slot}@{anchor.text()}"
        with self.token.session() as s:
            for _ in range(2):
                handle = self._move_kept(s, slot, label)
                if handle is None:
                    handle = self._adopt(s, slot, anchor, label)
                self._mine, self._written = (self.token.generation, handle), label
                found = self._found(s)
                if Found(anchor, handle, slot) in found:
                    self._last = anchor
                    self.prunable = sum(f.handle is None for f in found) > FIXED_KEPT
                    return [f.anchor for f in found]
                # Destroyed by another process (`audit new-chain`) between the move and the
                # search: made afresh, once.
                self._mine = None
        raise HsmOperationFailed("the audit anchor written is not in the token")

    def replaced(self) -> bool:
        """Whether the object this writer last wrote is gone from the token (only `reset`
        destroys a moving object)."""
        if self._written is None or self._pid != os.getpid():
            return False
        with self.token.session() as s:
            return self._written.encode() not in {lbl for _, lbl in hk.moving(s, self.label)}

    def release(self) -> None:
        """Give up the slot, and with it the object: another process may adopt it now."""
        with self._writing:
            self.slots.release()
            self._mine = self._written = None

    def forget(self) -> None:
        """The token's anchors were replaced (`audit new-chain`, a restore): this writer's
        object and floor are gone; its next write starts as a new process's would."""
        self._mine = self._written = self._last = None

    def _move_kept(self, s: Session, slot: str, label: str) -> int | None:
        """The object this process moved last, moved to `label`; None if its handle no
        longer names it (another module instance, or the object is gone: it may name
        another object now). Refused if someone else moved it since: two processes share
        the slot (see SlotLock)."""
        mine = self._mine
        if mine is None or mine[0] != self.token.generation:
            return None
        now = hk.moving_label(s, mine[1], self.label)
        parts = _split(now.decode(errors="replace").removeprefix(self.label + "@")) \
            if now is not None else None
        if parts is None or parts[0] != slot:
            return None
        if now != (self._written or "").encode():
            raise _shared(slot)
        return mine[1] if hk.move(s, mine[1], label) else None

    def _adopt(self, s: Session, slot: str, anchor: Anchor, label: str) -> int:
        """Our slot's object, moved to `label`: the one this process wrote (its handle went
        stale), or, in a process that wrote none yet, the one a previous process of the
        slot left (the highest, if several); or a new one. An object of our slot that this
        process did not write, or one ahead of the chain, is refused, never moved."""
        ours = sorted((f for f in self._found(s) if f.slot == slot),
                      key=lambda f: f.anchor.seq, reverse=True)
        for f in ours:
            assert f.handle is not None
            if self._written is not None and \
                    f"{self.label}@{slot}@{f.anchor.text()}" != self._written:
                raise _shared(slot)
            if f.anchor.seq >= anchor.seq:
                raise ChainRefused(f"the HSM anchor of this writer's slot is at "
                                   f"{f.anchor.seq}, the audit chain's new head at "
                                   f"{anchor.seq}: events were cut")
            if hk.move(s, f.handle, label):
                return f.handle
        return hk.put_moving(s, self.label, label)

    def prune(self, newest: Anchor, doomed: set[Anchor]) -> None:
        """Remove `doomed` fixed anchors (older ones the chain holds). No moving object is
        ever destroyed here: its writer may be alive and moving it (PKCS#11 has no
        compare-and-destroy)."""
        with self.token.session() as s:
            hk.destroy_data(s, self.label, lambda v: Anchor.decode(v) in doomed
                            and Anchor.decode(v) != newest)

    def reset(self, anchor: Anchor) -> None:
        """Only for `keysvc audit new-chain`: the anchor names the new chain's head, and is
        the only one left (every writer's object goes: run it with the servers stopped)."""
        slot = self.slots.name()
        with self.token.session() as s:
            new = hk.put_moving(s, self.label, f"{self.label}@{slot}@{anchor.text()}")
            for h, _ in hk.moving(s, self.label):   # whatever their labels say
                if h != new:
                    hk.destroy_moving(s, h)
            hk.destroy_data(s, self.label)
            self._mine, self._last = (self.token.generation, new), anchor
            self._written = f"{self.label}@{slot}@{anchor.text()}"

    def legacy_checkpoints(self, first_event_id: str) -> dict[int, set[str]]:
        """Checkpoints written before anchors existed: sequence -> hashes."""
        if not first_event_id:
            return {}
        with self.token.session() as s:
            values = hk.data_values(s, LEGACY_CHECKPOINT + first_event_id)
        out: dict[int, set[str]] = {}
        for v in values:
            out.setdefault(int.from_bytes(v[:8], "big"), set()).add(v[8:40].hex())
        return out
