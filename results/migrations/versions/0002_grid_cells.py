"""Schema 2: the cells a grid expands to, so never-submitted cells count as "new" on the dashboard.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "grid_cells",
        sa.Column("grid", sa.String(200), primary_key=True),
        sa.Column("run_id", sa.String(32), primary_key=True),
        sa.Column("cell", sa.String(300), nullable=False),
    )
