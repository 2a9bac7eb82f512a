"""Request rows: reading them back within a tenant, cancelling one, and the queued ones in
fair order (which tenants wait on a model, each tenant's oldest first)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ColumnElement, and_, select, update
from sqlalchemy.orm import Session, aliased

from core.enums import OPEN_STATUSES, Priority, RequestStatus
from storage.tables import Request


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


def _queued(table: type[Request], model: str, priority: Priority) -> ColumnElement[bool]:
    return and_(
        table.status == RequestStatus.QUEUED, table.model == model, table.priority == priority
    )


def queued_tenants(
    session: Session, *, model: str, priority: Priority, limit: int
) -> set[uuid.UUID]:
    """The tenants with requests queued on a model at a priority, up to ``limit`` of them.

    A skip scan of ``ix_requests_fair_order``: one index probe per tenant, however many
    requests each has queued.
    """
    seed = select(Request.tenant_id).where(_queued(Request, model, priority))
    first = seed.order_by(Request.tenant_id).limit(1).scalar_subquery()
    found = select(first.label("tenant_id")).cte("waiting", recursive=True)
    later = aliased(Request)
    following = (
        select(later.tenant_id)
        .where(_queued(later, model, priority), later.tenant_id > found.c.tenant_id)
        .order_by(later.tenant_id)
        .limit(1)
        .scalar_subquery()
    )
    found = found.union_all(
        select(following.label("tenant_id")).where(found.c.tenant_id.is_not(None))
    )
    query = select(found.c.tenant_id).where(found.c.tenant_id.is_not(None)).limit(limit)
    return set(session.scalars(query))


def lock_oldest_queued(
    session: Session, *, model: str, priority: Priority, tenant_id: uuid.UUID, limit: int
) -> list[Request]:
    """A tenant's oldest queued requests on a model that were never tried, locked for the
    caller's claim; rows another worker is claiming are skipped, not waited on. A request
    tried before is left to its own message, which counts its tries."""
    return list(
        session.scalars(
            select(Request)
            .where(
                _queued(Request, model, priority),
                Request.tenant_id == tenant_id,
                Request.attempts == 0,
            )
            .order_by(Request.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
