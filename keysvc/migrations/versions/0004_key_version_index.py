"""An index on the storage-key version of stored device and master keys.

Revision ID: 0004

The rewrap job (keysvc/custody/rewrap.py) walks the rows still on an older version, and a
version may be destroyed only when no row names it: both are lookups by key_version, over
millions of rows.
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TABLES = ("device_keys", "master_keys")


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    for table in TABLES:
        if any(ix["column_names"] == ["key_version"] for ix in inspector.get_indexes(table)):
            continue  # 0001 made it from keysvc.store's current declarations
        op.create_index(f"ix_{table}_key_version", table, ["key_version"])


def downgrade() -> None:
    for table in TABLES:
        op.drop_index(f"ix_{table}_key_version", table)
