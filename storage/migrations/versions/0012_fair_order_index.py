"""ix_requests_fair_order: which tenants wait on a model, and each one's oldest request

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 21:00:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.create_index(
            "ix_requests_fair_order",
            ["status", "model", "priority", "tenant_id", "created_at"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.drop_index("ix_requests_fair_order")
