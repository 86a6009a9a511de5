"""Schema 4: an index of runs by id and status, so that reading a benchmark's values joins each to its run
without touching the runs table (the leaderboard at 10,000 runs: benchmarks/store.py).

Revision ID: 0004
Revises: 0003
"""
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_runs_id_status", "runs", ["id", "status"])
