"""evaluation runs: a baseline flag, the failure reason, the replay jobs; gold labels on the pool

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 17:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "eval_runs",
        sa.Column("baseline", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.add_column("eval_runs", sa.Column("error", sa.Text(), nullable=True))
    op.add_column("eval_runs", sa.Column("jobs", sa.JSON(), nullable=True))
    op.create_index("ix_eval_runs_task_created", "eval_runs", ["task", "created_at"])
    op.add_column("eval_pool", sa.Column("gold", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("eval_pool", "gold")
    op.drop_index("ix_eval_runs_task_created", table_name="eval_runs")
    op.drop_column("eval_runs", "jobs")
    op.drop_column("eval_runs", "error")
    op.drop_column("eval_runs", "baseline")
