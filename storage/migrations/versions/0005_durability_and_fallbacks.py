"""durability and fallbacks: publish leases, delivery counts, fallback records, job sources

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 15:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("published_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("deliveries", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("fallbacks", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("fallback_reason", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("first_model", sa.String(length=200), nullable=True))

    op.create_table(
        "job_sources",
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("format", sa.String(length=8), nullable=False),
        sa.Column("strict", sa.Boolean(), nullable=False),
        sa.Column("cursor", sa.Integer(), nullable=False, server_default="0"),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
            name=op.f("fk_job_sources_job_id_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_job_sources")),
    )


def downgrade() -> None:
    op.drop_table("job_sources")
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.drop_column("first_model")
        batch_op.drop_column("fallback_reason")
        batch_op.drop_column("fallbacks")
        batch_op.drop_column("deliveries")
        batch_op.drop_column("published_at")
