"""XSD 1.0 schemas for the migration files (shared/spec/migration-crypto-profile.md).

Shipped as package data so that validation works offline: the xenc and ds elements come from
local subsets imported by relative schemaLocation, never from w3.org.
"""
from __future__ import annotations

from pathlib import Path

SCHEMA_DIR = Path(__file__).resolve().parent

MIGRATION_FILE = "migration-file.xsd"
GROUP_INFORMATION = "group-information.xsd"


def schema_path(name: str) -> Path:
    """Path of a bundled schema; refuses anything outside this directory.

    The relative imports between the schemas only resolve when lxml is given the real file
    path (its base URL), so callers should parse from this path rather than from a string.
    """
    path = (SCHEMA_DIR / name).resolve()
    if path.parent != SCHEMA_DIR or path.suffix != ".xsd" or not path.is_file():
        raise FileNotFoundError(f"no bundled schema named {name!r}")
    return path
