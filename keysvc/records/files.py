"""Stored results of Migration Group Encrypted Files (the `migration_files` table).

A file sent again is answered from here (idempotency by MigrationFileID), so the stored
result is sealed: an edited verdict or KCV would otherwise be handed to the caller.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from keysvc import store as st
from keysvc.records.seal import canonical

if TYPE_CHECKING:
    from keysvc.records import Records


@dataclass(frozen=True)
class FileRecord:
    file_id: str
    service: str
    digest: str
    result: str


def _canonical(file_id: str, service: str, digest: str, result: str) -> bytes:
    return canonical("migration-file", file_id, service, digest, result)


class Files:
    def __init__(self, records: "Records") -> None:
        self.r = records

    def get(self, file_id: str, service: str) -> FileRecord | None:
        row = self.r.fetch(None, select(st.migration_files).where(
            st.migration_files.c.file_id == file_id,
            st.migration_files.c.service == service), f"migration_files/{service}/{file_id}")
        if row is None:
            return None
        if not self.r.sealers[service].valid(
                _canonical(row.file_id, row.service, row.digest, row.result), row.seal):
            raise self.r.refuse(None, f"migration_files/{service}/{file_id}",
                                "fails its HSM seal")
        return FileRecord(row.file_id, row.service, row.digest, row.result)

    def insert(self, conn: Any, file_id: str, service: str, digest: str, result: str,
               created_at: Any) -> None:
        seal = self.r.sealers[service].seal(_canonical(file_id, service, digest, result))
        conn.execute(st.migration_files.insert().values(
            file_id=file_id, service=service, digest=digest, result=result,
            created_at=created_at, seal=seal))
