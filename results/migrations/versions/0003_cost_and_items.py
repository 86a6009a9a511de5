"""Schema 3: what a run cost (device-hours, teacher forward samples, the student's GFLOPs and images/s), and its
per-item results (a bit per test item and metric), which intervals and paired tests read.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as runs:
        runs.add_column(sa.Column("world_size", sa.Integer))
        runs.add_column(sa.Column("device_hours", sa.Float))
        runs.add_column(sa.Column("teacher_forward_samples", sa.BigInteger))
        runs.add_column(sa.Column("gflops_image", sa.Float))
        runs.add_column(sa.Column("gflops_text", sa.Float))
        runs.add_column(sa.Column("images_per_second", sa.Float))
    op.create_table(
        "item_results",
        sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("benchmark", sa.String(200), primary_key=True),
        sa.Column("metric", sa.String(100), primary_key=True),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("bits", sa.LargeBinary, nullable=False),
    )
