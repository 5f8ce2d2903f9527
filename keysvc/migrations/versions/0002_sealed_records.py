"""Sealed records: a seal column on every security-relevant table, key ids, key versions,
and this database's instance id.

Revision ID: 0002

Rows that exist at upgrade have no seal yet. They are sealed once, by the first start that
has the HSM (`keysvc.records.upgrade`), and only if the token set has never been upgraded
before: rows are trusted once, at upgrade, and never again (documented in the README).
"""
import uuid

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_SEALED = ["keys", "import_jobs", "operations", "migration_files", "device_keys",
           "master_keys"]


def _add(table: str, column: sa.Column) -> None:
    # 0001 creates its tables from keysvc.store's current declarations, so a new database
    # has these columns already; an old one gets them here.
    if column.name not in {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)}:
        with op.batch_alter_table(table) as b:
            b.add_column(column)


def upgrade() -> None:
    for table in _SEALED:
        _add(table, sa.Column("seal", sa.LargeBinary, nullable=True))
    _add("keys", sa.Column("key_id", sa.String(64), nullable=False, server_default=""))
    _add("operations", sa.Column("partition", sa.String(16), nullable=False,
                                 server_default=""))
    for table in ("device_keys", "master_keys"):
        _add(table, sa.Column("key_version", sa.Integer, nullable=False, server_default="1"))
        # a file's stored keys are looked up by its MigrationFileID (its result row gone)
        if f"ix_{table}_file_id" not in {i["name"] for i in
                                          sa.inspect(op.get_bind()).get_indexes(table)}:
            op.create_index(f"ix_{table}_file_id", table, ["file_id"])
    t = op.create_table("instance", sa.Column("id", sa.Integer, primary_key=True),
                        sa.Column("instance_id", sa.String(64), nullable=False))
    op.bulk_insert(t, [{"id": 1, "instance_id": uuid.uuid4().hex}])


def downgrade() -> None:
    op.drop_table("instance")
    for table in ("device_keys", "master_keys"):
        op.drop_index(f"ix_{table}_file_id", table)
        with op.batch_alter_table(table) as b:
            b.drop_column("key_version")
    with op.batch_alter_table("operations") as b:
        b.drop_column("partition")
    with op.batch_alter_table("keys") as b:
        b.drop_column("key_id")
    for table in _SEALED:
        with op.batch_alter_table(table) as b:
            b.drop_column("seal")
