"""Import jobs (the `import_jobs` table): the RSA pair an officer wraps a new key to.

Sealed, because the record names the partition and the public key an officer is given:
a public key swapped in the database would have an officer wrap a transport key to an
attacker. The pair's objects carry the job's id in CKA_ID (crash reconciliation).
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update

from keysvc import store as st
from keysvc.records.seal import canonical

if TYPE_CHECKING:
    from keysvc.records import Records

LABEL_PREFIX = "import-job:"


@dataclass(frozen=True)
class ImportJobRecord:
    id: str
    name: str
    partition: str
    public_key_pem: str
    created_by: str
    created_at: dt.datetime
    expires_at: dt.datetime

    @property
    def label(self) -> str:
        return f"{LABEL_PREFIX}{self.id}"

    def canonical(self) -> bytes:
        return canonical("import-job", self.id, self.name, self.partition,
                         self.public_key_pem, self.created_by, self.created_at,
                         self.expires_at)


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _record(r: Any) -> ImportJobRecord:
    return ImportJobRecord(r.id, r.name, r.partition, r.public_key_pem, r.created_by,
                           _aware(r.created_at), _aware(r.expires_at))


class ImportJobs:
    def __init__(self, records: "Records") -> None:
        self.r = records

    def insert(self, conn: Any, job: ImportJobRecord) -> None:
        seal = self.r.sealers[job.partition].seal(job.canonical())
        conn.execute(st.import_jobs.insert().values(
            id=job.id, name=job.name, partition=job.partition,
            public_key_pem=job.public_key_pem, created_by=job.created_by,
            created_at=job.created_at, expires_at=job.expires_at, seal=seal))

    def set_public_key(self, conn: Any, job: ImportJobRecord, pem: str) -> None:
        """The pair exists: the row names its public key (only an unkeyed row changes)."""
        new = replace(job, public_key_pem=pem)
        seal = self.r.sealers[job.partition].seal(new.canonical())
        conn.execute(update(st.import_jobs).where(st.import_jobs.c.id == job.id,
                                                  st.import_jobs.c.public_key_pem == "")
                     .values(public_key_pem=pem, seal=seal))

    def get(self, conn: Any, job_id: str) -> ImportJobRecord | None:
        """The verified record, or None."""
        row = self.r.fetch(conn, select(st.import_jobs).where(st.import_jobs.c.id == job_id),
                           f"import_jobs/{job_id}")
        if row is None:
            return None
        try:
            job = _record(row)
        except Exception:
            raise self.r.refuse(conn, f"import_jobs/{job_id}", "is malformed") from None
        sealer = self.r.served_sealer(job.partition)
        if sealer is None or not sealer.valid(job.canonical(), row.seal):
            raise self.r.refuse(conn, f"import_jobs/{job_id}", "fails its HSM seal")
        return job

    def delete(self, conn: Any, job_ids: list[str]) -> None:
        if job_ids:
            conn.execute(st.import_jobs.delete().where(st.import_jobs.c.id.in_(job_ids)))

    def expired(self, conn: Any, cutoff: dt.datetime) -> list[ImportJobRecord]:
        """Verified jobs that expired before `cutoff`. A row whose seal fails is left alone
        (its expiry may be forged to destroy a job early) and reported."""
        out = []
        for row in self.r.fetch(conn, select(st.import_jobs).where(
                st.import_jobs.c.expires_at < cutoff), "import_jobs", one=False):
            try:
                job = _record(row)
                if self.r.elsewhere(job.partition):
                    continue  # the process serving that partition purges it
                ok = self.r.sealers[job.partition].valid(job.canonical(), row.seal)
            except Exception:
                ok = False
            if ok:
                out.append(job)
            else:
                st.after_tx(conn, partial(self.r.flag, f"import_jobs/{row.id}",
                                          "fails its HSM seal; not purged"))
        return out

    def outstanding(self, created_by: str, now: dt.datetime) -> int:
        """How many unexpired jobs this officer has (a quota; a forged row only denies)."""
        with self.r.store.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(st.import_jobs).where(
                st.import_jobs.c.created_by == created_by,
                st.import_jobs.c.expires_at > now)).scalar_one()

    def ids(self, partition: str) -> set[str]:
        """Every job id of a partition (reconciliation: a pair without its row goes)."""
        with self.r.store.engine.connect() as conn:
            return {r.id for r in conn.execute(select(st.import_jobs.c.id).where(
                st.import_jobs.c.partition == partition))}
