"""Webhook secrets shown once and rotated with a grace period; replays counted for a rate limit

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 21:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_endpoints", schema=None) as batch_op:
        batch_op.add_column(sa.Column("previous_secret", sa.String(100), nullable=True))
        batch_op.add_column(
            sa.Column("previous_secret_until", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("secret_shown_at", sa.DateTime(timezone=True), nullable=True))
    # Endpoints that exist were shown in full by the old list: count them as shown.
    op.execute("UPDATE webhook_endpoints SET secret_shown_at = created_at")
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("replayed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(
            "ix_webhook_deliveries_tenant_replayed", ["tenant_id", "replayed_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_webhook_deliveries_tenant_replayed")
        batch_op.drop_column("replayed_at")
    with op.batch_alter_table("webhook_endpoints", schema=None) as batch_op:
        batch_op.drop_column("secret_shown_at")
        batch_op.drop_column("previous_secret_until")
        batch_op.drop_column("previous_secret")
