"""canary arms on requests and the canary decisions table

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 13:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

_ON_CANARY = sa.text("canary_route IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("canary_route", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("canary_arm", sa.String(length=16), nullable=True))
        batch_op.create_index(
            "ix_requests_canary",
            ["canary_route", "created_at"],
            unique=False,
            postgresql_where=_ON_CANARY,
            sqlite_where=_ON_CANARY,
        )
    op.create_table(
        "canary_decisions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("route", sa.String(length=100), nullable=False),
        sa.Column("candidate", sa.String(length=200), nullable=False),
        sa.Column("control", sa.String(length=200), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("decided_by", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_canary_decisions")),
    )
    with op.batch_alter_table("canary_decisions", schema=None) as batch_op:
        batch_op.create_index("ix_canary_decisions_route", ["route", "id"], unique=False)


def downgrade() -> None:
    op.drop_table("canary_decisions")
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.drop_index("ix_requests_canary")
        batch_op.drop_column("canary_arm")
        batch_op.drop_column("canary_route")
