"""Initial schema: keys, operations, migration files, device and master keys, escrow, audit.

Revision ID: 0001
"""
from alembic import op

from keysvc import store

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# The first revision is the schema as keysvc.store declares it at 0.1; later revisions
# must spell out their changes with op.* so that old databases move forward step by step.
_TABLES = ["keys", "import_jobs", "operations", "migration_files", "device_keys",
           "master_keys", "escrows", "escrow_chfs", "escrow_releases", "audit_events",
           "audit_head"]


def upgrade() -> None:
    bind = op.get_bind()
    store.metadata.create_all(bind, tables=[store.metadata.tables[t] for t in _TABLES])
    # The audit chain's head exists from the start, so that the first appenders of a new
    # database (several replicas at once) queue on its row lock instead of racing to make it.
    op.bulk_insert(store.audit_head, [{"id": 1, "seq": 0, "hash": "0" * 64}])


def downgrade() -> None:
    bind = op.get_bind()
    store.metadata.drop_all(bind, tables=[store.metadata.tables[t] for t in _TABLES])
