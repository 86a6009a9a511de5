"""Schema 6: a running run's progress (step of total, samples/s, estimated seconds left), written while it trains,
and notes a reader of a run's numbers should know (e.g. micro-batch BatchNorm statistics under train.accum_freq).

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as runs:
        runs.add_column(sa.Column("step", sa.Integer))
        runs.add_column(sa.Column("total_steps", sa.Integer))
        runs.add_column(sa.Column("samples_per_second", sa.Float))
        runs.add_column(sa.Column("eta_seconds", sa.Float))
        runs.add_column(sa.Column("notes", sa.Text))
