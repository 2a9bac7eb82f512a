"""evaluation: the PII-stripped sample pool, its counters, evaluation runs and their items

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 16:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TASKS = ("extract", "expand", "classify", "chat", "complete")


def _task() -> sa.Enum:
    return sa.Enum(*TASKS, name="task_kind", native_enum=False, length=16)


def upgrade() -> None:
    op.create_table(
        "eval_pool",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("task", _task(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("request_id", sa.Uuid(), nullable=False),
        sa.Column("input", sa.JSON(), nullable=False),
        sa.Column("output", sa.JSON(), nullable=False),
        sa.Column("pii_counts", sa.JSON(), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_eval_pool_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_eval_pool")),
        sa.UniqueConstraint("task", "slot", name="uq_eval_pool_task_slot"),
    )
    op.create_index(op.f("ix_eval_pool_tenant_id"), "eval_pool", ["tenant_id"])
    op.create_index(op.f("ix_eval_pool_request_id"), "eval_pool", ["request_id"])
    op.create_table(
        "eval_counters",
        sa.Column("task", _task(), nullable=False),
        sa.Column("seen", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("task", name=op.f("pk_eval_counters")),
    )
    op.create_table(
        "eval_runs",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("candidate", sa.String(length=200), nullable=False),
        sa.Column("reference", sa.String(length=200), nullable=False),
        sa.Column("task", _task(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "queued",
                "running",
                "succeeded",
                "failed",
                name="eval_run_status",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("scores", sa.JSON(), nullable=True),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("ci_low", sa.Float(), nullable=True),
        sa.Column("ci_high", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_eval_runs")),
    )
    op.create_table(
        "eval_run_items",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("pool_id", sa.Integer(), nullable=True),
        sa.Column("request_id", sa.Uuid(), nullable=False),
        sa.Column("candidate_output", sa.JSON(), nullable=True),
        sa.Column("reference_output", sa.JSON(), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["eval_runs.id"],
            name=op.f("fk_eval_run_items_run_id_eval_runs"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["pool_id"],
            ["eval_pool.id"],
            name=op.f("fk_eval_run_items_pool_id_eval_pool"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_eval_run_items")),
    )
    op.create_index(op.f("ix_eval_run_items_run_id"), "eval_run_items", ["run_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_eval_run_items_run_id"), table_name="eval_run_items")
    op.drop_table("eval_run_items")
    op.drop_table("eval_runs")
    op.drop_table("eval_counters")
    op.drop_index(op.f("ix_eval_pool_request_id"), table_name="eval_pool")
    op.drop_index(op.f("ix_eval_pool_tenant_id"), table_name="eval_pool")
    op.drop_table("eval_pool")
