"""Writing and publishing: insert prepared requests, commit, and only then publish them.

The API handlers, bulk jobs, the embedded demo and evaluation runs all come through here;
a publish that fails leaves the committed rows to the reconciler.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.enums import RequestStatus
from router import Route
from storage.bulk import insert_rows
from storage.reconcile import forget_publish
from storage.requests import find_by_idempotency_key
from storage.tables import Base, Job, Request, utcnow
from submission.prepare import BadRequest, Prepared
from submission.services import Services
from tasks.app import PublishError, publish_runs
from tasks.rows import run_message

log = logging.getLogger(__name__)

# A committed request to publish: its row's columns and what was prepared for it.
Fresh = tuple[dict[str, Any], Prepared]


def submit_many(services: Services, prepared: Sequence[Prepared]) -> list[tuple[Request, bool]]:
    """Insert prepared requests in one transaction, commit, then publish them.

    Returns each request's row and whether it is new (an idempotent replay is not).
    """
    results: list[tuple[Request, bool]] = []
    fresh: list[Fresh] = []
    now = utcnow()
    with services.sessions.begin() as session:
        for item in prepared:
            key = item.body.idempotency_key
            existing = find_by_idempotency_key(session, item.tenant_id, key) if key else None
            if existing is not None:
                results.append((existing, False))
                continue
            columns = _row(item, now, job_id=None, deadline_at=_deadline(item, now))
            row = Request(**columns)
            session.add(row)
            results.append((row, True))
            fresh.append((columns, item))
        try:
            session.flush()
        except IntegrityError as exc:  # a concurrent submit with the same idempotency key
            raise BadRequest("idempotency_key is already in use by a request in flight") from exc
    publish_requests(services, fresh)
    return results


def submit_job(
    services: Services,
    prepared: Sequence[Prepared],
    *,
    job: Job,
    extra: Sequence[Base] = (),
    deadline_at: datetime | None = None,
) -> None:
    """Insert a job, its rows and its requests in one transaction, commit, then publish."""
    with services.sessions.begin() as session:
        session.add(job)
        # The job's row goes in first: ``extra`` rows refer to it, and with no relationship
        # between their mappers a single flush may insert them in either order.
        session.flush()
        session.add_all(extra)
        session.flush()
        fresh = insert_job_requests(session, prepared, job_id=job.id, deadline_at=deadline_at)
    publish_requests(services, fresh)


def insert_job_requests(
    session: Session,
    prepared: Sequence[Prepared],
    *,
    job_id: uuid.UUID,
    deadline_at: datetime | None,
) -> list[Fresh]:
    """The bulk path: rows copied in (``storage.bulk``) rather than ORM objects. Publish
    after commit."""
    now = utcnow()
    rows = [_row(item, now, job_id=job_id, deadline_at=deadline_at) for item in prepared]
    insert_rows(session, Request.__table__, rows)
    return list(zip(rows, prepared, strict=True))


def _row(
    item: Prepared, now: datetime, *, job_id: uuid.UUID | None, deadline_at: datetime | None
) -> dict[str, Any]:
    return {
        "id": item.request_id,
        "tenant_id": item.tenant_id,
        "job_id": job_id,
        "item_id": item.item_id,
        "line": item.line,
        "webhook_url": item.body.webhook_url,
        "task": item.body.task,
        "status": RequestStatus.QUEUED,
        "priority": item.body.priority,
        "model": item.model,
        "input": item.body.input,
        "params": item.body.params.stored(),
        "idempotency_key": item.body.idempotency_key,
        "attempts": 0,
        "created_at": now,
        "queued_at": now,
        "published_at": now,
        "deadline_at": deadline_at,
        "reserved_cost": item.reserved_cost,
        **_route_columns(item.route),
    }


def _deadline(item: Prepared, now: datetime) -> datetime | None:
    seconds = item.body.deadline_s
    return None if seconds is None else now + timedelta(seconds=seconds)


def _route_columns(chosen: Route | None) -> dict[str, Any]:
    if chosen is None:
        return {
            "first_model": None,
            "fallbacks": None,
            "fallback_reason": None,
            "canary_route": None,
            "canary_arm": None,
        }
    return {
        "first_model": chosen.first_model or chosen.model,
        "fallbacks": list(chosen.fallbacks) or None,
        "fallback_reason": chosen.reason,
        "canary_route": chosen.canary_route,
        "canary_arm": chosen.canary_arm,
    }


def publish_requests(services: Services, fresh: Sequence[Fresh]) -> None:
    """Publish committed requests in bundles per model; a failure leaves them to the
    reconciler, which re-publishes what sits queued past its lease."""
    committed_at = time.time()
    messages = [
        run_message(
            columns,
            engine_request=item.engine_request,
            stream=item.body.stream,
            enqueued_at=committed_at,
        )
        for columns, item in fresh
    ]
    try:
        publish_runs(services.celery, services.config, messages)
    except PublishError as exc:  # the rows are committed; the reconciler publishes them later
        log.exception("%d of %d requests left to the reconciler", len(exc.unsent), len(messages))
        _forget_publish(services, [uuid.UUID(m.request_id) for m in exc.unsent])


def _forget_publish(services: Services, request_ids: list[uuid.UUID]) -> None:
    """Mark them unpublished, so the reconciler sends them as soon as the broker is back."""
    try:
        with services.sessions.begin() as session:
            forget_publish(session, request_ids)
    except Exception:  # their lease runs out instead
        log.exception("marking %d requests unpublished failed", len(request_ids))
