"""DeviceCertificate checks in a worker process, overlapping the HSM work of a file.

Certificate verification is CPU work under the GIL and the HSM loop is too, so threads
cannot overlap them; a worker process can, on the second core. Small files are checked
inline: for a handful of certificates the round trip costs more than it saves.
"""
from __future__ import annotations

import datetime as dt
import logging
import multiprocessing
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Sequence

from cryptography.hazmat.primitives.serialization import Encoding

from keysvc.device_certificate import CertificateVerdict, TrustStore, verify_device_certificate

log = logging.getLogger("keysvc.certpool")

INLINE_BELOW = 64
_TRUST: TrustStore | None = None


def _init(anchors: list[bytes], crls: list[bytes]) -> None:
    global _TRUST
    from cryptography import x509
    _TRUST = TrustStore(tuple(x509.load_der_x509_certificate(a) for a in anchors),
                        tuple(x509.load_der_x509_crl(c) for c in crls))


def _verify_all(items: list[tuple[bytes, str | None]], at: dt.datetime
                ) -> list[CertificateVerdict]:
    assert _TRUST is not None
    return [verify_device_certificate(der, chf, _TRUST, at=at) for der, chf in items]


class Checked:
    """A file's certificate checks on their way. If the worker dies meanwhile (killed, out
    of memory), the pool is replaced and the checks run once more; a second death is the
    call's error."""

    def __init__(self, checker: "CertificateChecker", items: list, at: dt.datetime) -> None:
        self.checker, self.items, self.at = checker, items, at
        self.pool, self.future = checker._send(items, at)

    def result(self) -> list[CertificateVerdict]:
        try:
            return self.future.result()
        except BrokenProcessPool:
            log.warning("a certificate worker died; it is replaced and the checks run again")
            self.checker._replace(self.pool)
            _, again = self.checker._send(self.items, self.at)
            return again.result()


class CertificateChecker:
    def __init__(self, trust: TrustStore, workers: int = 1) -> None:
        self.trust = trust
        self.workers = workers
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = self._new_pool() if workers > 0 else None

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init,
            initargs=([a.public_bytes(Encoding.DER) for a in self.trust.anchors],
                      [c.public_bytes(Encoding.DER) for c in self.trust.crls]))

    def _replace(self, broken: ProcessPoolExecutor | None) -> None:
        """A new pool for the broken one (once, however many calls saw it break)."""
        with self._lock:
            if self._pool is broken and broken is not None:
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()

    def _send(self, items: list, at: dt.datetime
              ) -> tuple[ProcessPoolExecutor | None, "Future[list[CertificateVerdict]]"]:
        pool = self._pool
        if pool is None or len(items) < INLINE_BELOW:
            done: Future[list[CertificateVerdict]] = Future()
            done.set_result([verify_device_certificate(der, chf, self.trust, at=at)
                             for der, chf in items])
            return pool, done
        try:
            return pool, pool.submit(_verify_all, items, at)
        except BrokenProcessPool:  # broken before this call: replaced, and sent again
            self._replace(pool)
            return self._send(items, at)

    def submit(self, items: Sequence[tuple[bytes, str | None]], at: dt.datetime) -> Checked:
        return Checked(self, list(items), at)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
