"""Schema 1: runs, their metrics and training curves (clipkd's first store).

Revision ID: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("clipkd_schema", sa.Column("key", sa.String(32), primary_key=True),
                    sa.Column("value", sa.String(64), nullable=False))
    op.create_table(
        "runs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("setting_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("teacher", sa.String(300)),
        sa.Column("student", sa.String(200), nullable=False),
        sa.Column("method", sa.String(200), nullable=False),
        sa.Column("terms", sa.Text, nullable=False),
        sa.Column("dataset", sa.String(300), nullable=False),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("config", sa.Text, nullable=False),
        sa.Column("run_dir", sa.Text),
        sa.Column("grid", sa.String(200)),
        sa.Column("host", sa.String(200)),
        sa.Column("code_version", sa.String(100)),
        sa.Column("student_params", sa.Integer),
        sa.Column("teacher_params", sa.Integer),
        sa.Column("train_seconds", sa.Float),
        sa.Column("eval_seconds", sa.Float),
        sa.Column("started_at", sa.String(40)),
        sa.Column("finished_at", sa.String(40)),
        sa.Column("updated_at", sa.String(40), nullable=False),
    )
    op.create_index("ix_runs_cell", "runs", ["student", "dataset", "teacher", "method"])
    op.create_index("ix_runs_setting", "runs", ["setting_id", "method"])
    op.create_index("ix_runs_status", "runs", ["status"])
    op.create_index("ix_runs_grid", "runs", ["grid", "status"])
    op.create_table(
        "metrics",
        sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("benchmark", sa.String(200), primary_key=True),
        sa.Column("metric", sa.String(100), primary_key=True),
        sa.Column("value", sa.Float),
    )
    op.create_index("ix_metrics_benchmark", "metrics", ["benchmark", "metric", "run_id", "value"])
    op.create_table(
        "curves",
        sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("term", sa.String(100), primary_key=True),
        sa.Column("step", sa.Integer, primary_key=True),
        sa.Column("value", sa.Float),
    )
