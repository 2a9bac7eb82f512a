"""Request rows: creating them, reading them back within a tenant."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import Request


def find_by_idempotency_key(session: Session, tenant_id: uuid.UUID, key: str) -> Request | None:
    return session.scalar(
        select(Request).where(Request.tenant_id == tenant_id, Request.idempotency_key == key)
    )


def get_for_tenant(session: Session, tenant_id: uuid.UUID, request_id: uuid.UUID) -> Request | None:
    """A request by id, only if it belongs to this tenant; another tenant's id reads as absent."""
    return session.scalar(
        select(Request).where(Request.id == request_id, Request.tenant_id == tenant_id)
    )
