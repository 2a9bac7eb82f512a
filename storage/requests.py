"""Request rows: reading them back within a tenant, cancelling one."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from inferq.enums import OPEN_STATUSES, RequestStatus
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


def cancel_request(session: Session, request_id: uuid.UUID, at: datetime) -> bool:
    """Cancel a request still queued or running; False if it had already ended.

    A queued one is never claimed; a worker running it sees the status and aborts it.
    """
    result = session.execute(
        update(Request)
        .where(Request.id == request_id, Request.status.in_(OPEN_STATUSES))
        .values(status=RequestStatus.CANCELLED, finished_at=at)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]
