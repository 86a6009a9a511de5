"""Schema 8: the samples a run's student embedded in training, the no-grad scoring forward of batch selection
(selection/) included: what a selected run pays beyond the steps it trains.

Revision ID: 0008
Revises: 0007
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as runs:
        runs.add_column(sa.Column("student_forward_samples", sa.BigInteger))
