"""Versions of the admin token's MAC keys (issue 15): audit-mac and escrow-seal rotate.

Revision ID: 0005

An audit event's MAC names its audit-mac version in front from version 2 on ("v2:<hex>"),
which no longer fits 64 characters; an escrow record names the escrow-seal version of its
seal. Rows written before keep version 1 and need nothing done.
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    columns = {c["name"] for c in sa.inspect(bind).get_columns("escrows")}
    if "seal_version" not in columns:  # else 0001 made it from keysvc.store's declarations
        op.add_column("escrows", sa.Column("seal_version", sa.Integer, nullable=False,
                                           server_default="1"))
    if bind.dialect.name != "sqlite":  # SQLite keeps text of any length
        op.alter_column("audit_events", "mac", type_=sa.String(80),
                        existing_type=sa.String(64), existing_nullable=False)


def downgrade() -> None:
    op.drop_column("escrows", "seal_version")
