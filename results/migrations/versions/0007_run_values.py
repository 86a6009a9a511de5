"""Schema 7: each run's metrics also as one array of (key, value) records (results/store.py, RunValues), the read
of every run's values at once that leaderboards make; filled from the metrics already stored.

Revision ID: 0007
Revises: 0006
"""
import sqlalchemy as sa
from alembic import op

from results.store import index_values

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "run_values",
        sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    index_values(op.get_bind())
