"""Officers an organisation's own token vouches for (a split deployment, issue 16).

The roster is in the admin token, and in a split deployment both organisations' processes
hold the admin PIN: with it alone, either could write officers into the roster who would
then approve the other organisation's key ceremonies. So a process that serves one
organisation's partition (s1sp or dco, with admin) counts an officer only if that
partition's own token, which only this organisation's PIN opens, also names the officer's
key: the officers in `initial_officers` at its first start, and those whose enrolment was
approved through this process. A process serving both partitions, or only admin, trusts
the roster as it is (it holds every PIN it would need to change it anyway).

One data object per version (JSON: generation, fingerprints), newest generation counts; a
new version is written before the older ones are removed, so a crash between leaves two,
never none (none would let the next start vouch again from the configuration).
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable

from keysvc.hsm import Token
from keysvc.hsm import keys as hk

LABEL = "keysvc-officers-vouched"


class Vouched:
    def __init__(self, tokens: dict[str, Token], refresh_seconds: float = 1.0) -> None:
        orgs = [p for p in ("s1sp", "dco") if p in tokens]
        self.partition = orgs[0] if len(orgs) == 1 else ""
        self.token: Token | None = tokens[orgs[0]] if len(orgs) == 1 else None
        self.refresh_seconds = refresh_seconds
        self._cache: tuple[float, int, frozenset[str]] | None = None
        self._lock = threading.Lock()

    @property
    def applies(self) -> bool:
        """Whether officers must be vouched for here (one organisation's process)."""
        return self.token is not None

    def counts(self, fingerprint: str) -> bool:
        """An enrolled officer's key counts in this process."""
        return not self.applies or fingerprint in self._read()[1]

    def exists(self) -> bool:
        return self.token is not None and bool(self._versions())

    def seed(self, fingerprints: Iterable[str]) -> None:
        """At the first start of one organisation's process: its configured officers."""
        if self.token is not None and not self._versions():
            self._write(0, frozenset(fingerprints))

    def add(self, fingerprint: str) -> None:
        self._change(lambda now: now | {fingerprint})

    def remove(self, fingerprint: str) -> None:
        self._change(lambda now: now - {fingerprint})

    # ------------------------------------------------------------------ storage
    def _versions(self) -> list[tuple[int, frozenset[str]]]:
        assert self.token is not None
        with self.token.session() as s:
            raw = hk.data_values(s, LABEL)
        out = []
        for value in raw:
            try:
                doc = json.loads(value)
                generation, officers = doc["generation"], doc["officers"]
                if type(generation) is not int or not isinstance(officers, list):
                    continue
                out.append((generation, frozenset(map(str, officers))))
            except Exception:
                continue  # only this organisation's PIN writes here; unreadable is no vote
        return sorted(out, key=lambda v: v[0])

    def _read(self) -> tuple[int, frozenset[str]]:
        with self._lock:
            now = time.monotonic()
            if self._cache is None or now - self._cache[0] >= self.refresh_seconds:
                versions = self._versions()
                newest = versions[-1] if versions else (0, frozenset())
                self._cache = (now, newest[0], newest[1])
            return self._cache[1], self._cache[2]

    def _change(self, how: Callable[[frozenset[str]], frozenset[str]]) -> None:
        if self.token is None:
            return
        with self._lock:
            versions = self._versions()
            generation, now = versions[-1] if versions else (0, frozenset())
            changed = how(now)
            if changed != now:
                self._write(generation + 1, changed)
            self._cache = None

    def _write(self, generation: int, officers: frozenset[str]) -> None:
        assert self.token is not None
        value = json.dumps({"generation": generation, "officers": sorted(officers)},
                           separators=(",", ":")).encode()
        with self.token.session() as s:
            hk.put_data(s, LABEL, value)
            hk.destroy_data(s, LABEL, lambda v: v != value)
        self._cache = None
