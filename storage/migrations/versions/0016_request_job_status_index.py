"""ix_requests_job_status (job_id, status) replaces ix_requests_job_id; ix_requests_tenant_id goes

Whether a job still has open requests (asked by every writer commit of a job's batch) and how
many of them wait (asked before every admission chunk) were a walk over all of the job's rows;
with the status beside the job the index answers. ix_requests_tenant_id is the prefix of
uq_requests_tenant_idempotency, which serves its lookups: one index less to update on every
insert and status change.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-03 13:30:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.create_index("ix_requests_job_status", ["job_id", "status"], unique=False)
        batch_op.drop_index("ix_requests_job_id")
        batch_op.drop_index("ix_requests_tenant_id")


def downgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.create_index("ix_requests_tenant_id", ["tenant_id"], unique=False)
        batch_op.create_index("ix_requests_job_id", ["job_id"], unique=False)
        batch_op.drop_index("ix_requests_job_status")
