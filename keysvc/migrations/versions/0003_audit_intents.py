"""Audit intents: a call's audit event, written in the transaction of its effect.

Revision ID: 0003

A call that changes something writes its event into `audit_intents` inside the same
transaction as the change, so the two commit together or not at all; the audit writer then
chains it into `audit_events` (and deletes the intent) before the call returns. An intent
left by a crash is chained at the next start.
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if "audit_intents" in sa.inspect(op.get_bind()).get_table_names():
        return  # 0001 made it from keysvc.store's current declarations
    op.create_table(
        "audit_intents",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_intents")
