"""ix_requests_lease and ix_requests_deadline: the reconciler's scans read only what they take

ix_requests_lease (status, model, published_at) replaces ix_requests_status_model, its prefix.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_HAS_DEADLINE = sa.text("deadline_at IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.create_index(
            "ix_requests_lease", ["status", "model", "published_at"], unique=False
        )
        batch_op.create_index(
            "ix_requests_deadline",
            ["status", "deadline_at"],
            unique=False,
            postgresql_where=_HAS_DEADLINE,
            sqlite_where=_HAS_DEADLINE,
        )
        batch_op.drop_index("ix_requests_status_model")


def downgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.create_index("ix_requests_status_model", ["status", "model"], unique=False)
        batch_op.drop_index("ix_requests_deadline")
        batch_op.drop_index("ix_requests_lease")
