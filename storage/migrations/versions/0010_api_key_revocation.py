"""api_keys: revoked_at, and a prefix that is a public identifier, not the key's first characters

Keys used to be stored with their first ten characters as ``prefix``, seven of them secret.
Existing rows get a fresh random identifier instead (their keys keep working: lookup is by
hash); new keys carry their identifier in clear, ahead of the secret.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 21:00:00.000000
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    api_keys = sa.table("api_keys", sa.column("id", sa.Uuid()), sa.column("prefix", sa.String()))
    bind = op.get_bind()
    for (key_id,) in bind.execute(sa.select(api_keys.c.id)).all():
        bind.execute(
            api_keys.update()
            .where(api_keys.c.id == key_id)
            .values(prefix="iq_" + secrets.token_hex(6))
        )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_unique_constraint(batch_op.f("uq_api_keys_prefix"), ["prefix"])


def downgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_api_keys_prefix"), type_="unique")
        batch_op.drop_column("revoked_at")
