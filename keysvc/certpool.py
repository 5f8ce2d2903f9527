"""DeviceCertificate checks in a worker process, overlapping the HSM work of a file.

Certificate verification is CPU work under the GIL and the HSM loop is too, so threads
cannot overlap them; a worker process can, on the second core. Small files are checked
inline: for a handful of certificates the round trip costs more than it saves.
"""
from __future__ import annotations

import datetime as dt
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Sequence

from cryptography.hazmat.primitives.serialization import Encoding

from keysvc.device_certificate import CertificateVerdict, TrustStore, verify_device_certificate

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


class CertificateChecker:
    def __init__(self, trust: TrustStore, workers: int = 1) -> None:
        self.trust = trust
        self._pool: ProcessPoolExecutor | None = None
        if workers > 0:
            self._pool = ProcessPoolExecutor(
                max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init,
                initargs=([a.public_bytes(Encoding.DER) for a in trust.anchors],
                          [c.public_bytes(Encoding.DER) for c in trust.crls]))

    def submit(self, items: Sequence[tuple[bytes, str | None]], at: dt.datetime
               ) -> "Future[list[CertificateVerdict]]":
        if self._pool is None or len(items) < INLINE_BELOW:
            done: Future[list[CertificateVerdict]] = Future()
            done.set_result([verify_device_certificate(der, chf, self.trust, at=at)
                             for der, chf in items])
            return done
        return self._pool.submit(_verify_all, list(items), at)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
