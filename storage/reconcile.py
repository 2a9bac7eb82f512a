"""The reconciler's queries: which requests the transport lost, and which are past their time.

A request's ``published_at`` is its lease: set when it is published, and renewed by the worker
running it. Queued past ``queued_lease`` (or with a publish that failed, ``NULL``), its message
is presumed lost; running past ``running_lease``, its worker is presumed dead. Either way it
is put back to ``queued`` with a fresh lease and handed back to be published again; a worker
that claims it later is the only one to run it (``storage.ledger.claim``).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import datetime, timedelta

from sqlalchemy import Select, Update, select, update
from sqlalchemy.orm import Session

from core.enums import OPEN_STATUSES, RequestStatus
from storage.tables import Request

DEADLINE_PASSED = "deadline passed before it ran"


def take_lost(
    session: Session,
    now: datetime,
    *,
    queued_lease: timedelta,
    running_lease: timedelta,
    models: Collection[str],
    limit: int,
) -> list[Request]:
    """Lock requests whose lease ran out, renew it, and return them to re-publish.

    Only requests for ``models`` (those this reconciler's config knows how to send), at most
    ``limit`` of each model in one call, oldest lease first.
    """
    rows: list[Request] = []
    for model in sorted(models):
        taken = 0
        for query in lapsed_queries(
            now, model=model, queued_lease=queued_lease, running_lease=running_lease
        ):
            if taken >= limit:
                break
            found = session.scalars(
                query.limit(limit - taken).with_for_update(skip_locked=True)
            ).all()
            taken += len(found)
            rows += found
    for row in rows:
        row.status, row.published_at = RequestStatus.QUEUED, now
    return rows


def lapsed_queries(
    now: datetime, *, model: str, queued_lease: timedelta, running_lease: timedelta
) -> list[Select[Request]]:
    """One model's lapsed leases, as three range scans of ``ix_requests_lease``.

    Each names one status, the model and one bound on ``published_at``, so it reads only the
    rows it returns: never the lease of every queued request (one ``OR`` across statuses or
    across ``NULL`` and a bound would). ``bench.reconcile_scan`` shows the plans.
    """
    lapses = (
        (RequestStatus.QUEUED, Request.published_at.is_(None)),  # its publish failed
        (RequestStatus.QUEUED, Request.published_at < now - queued_lease),  # message lost
        (RequestStatus.RUNNING, Request.published_at < now - running_lease),  # worker died
    )
    return [
        select(Request)
        .where(Request.status == status, Request.model == model, lapsed)
        .order_by(Request.published_at)
        for status, lapsed in lapses
    ]


def overdue_update(now: datetime) -> Update:
    """Queued requests past their deadline, marked expired (``ix_requests_deadline``)."""
    return (
        update(Request)
        .where(
            Request.status == RequestStatus.QUEUED,
            Request.deadline_at.is_not(None),
            Request.deadline_at <= now,
        )
        .values(status=RequestStatus.EXPIRED, finished_at=now, error=DEADLINE_PASSED)
        .returning(Request.job_id)
        .execution_options(synchronize_session=False)
    )


def expire_overdue(session: Session, now: datetime) -> set[uuid.UUID]:
    """Queued requests past their deadline never run; return the jobs they belong to."""
    rows = session.execute(overdue_update(now))
    return {job_id for job_id in rows.scalars() if job_id is not None}


def stopped_among(
    session: Session, request_ids: list[uuid.UUID], now: datetime
) -> dict[uuid.UUID, RequestStatus]:
    """Of the requests a worker is running, those it should abort: cancelled, finished
    elsewhere, or past their deadline (expired here, in the same transaction)."""
    session.execute(
        update(Request)
        .where(
            Request.id.in_(request_ids),
            Request.status == RequestStatus.RUNNING,
            Request.deadline_at.is_not(None),
            Request.deadline_at <= now,
        )
        .values(status=RequestStatus.EXPIRED, finished_at=now, error=DEADLINE_PASSED)
        .execution_options(synchronize_session=False)
    )
    rows = session.execute(
        select(Request.id, Request.status).where(
            Request.id.in_(request_ids), Request.status.not_in(OPEN_STATUSES)
        )
    )
    return {request_id: status for request_id, status in rows}


def forget_publish(session: Session, request_ids: list[uuid.UUID]) -> None:
    """A publish failed: clear the lease so the reconciler sends them as soon as it can."""
    session.execute(
        update(Request)
        .where(Request.id.in_(request_ids), Request.status == RequestStatus.QUEUED)
        .values(published_at=None)
        .execution_options(synchronize_session=False)
    )


def renew(session: Session, request_ids: list[uuid.UUID], now: datetime) -> None:
    """A live worker vouches for the requests it is running.

    Rows another transaction holds (the writer committing their results) are skipped, not
    waited on: waiting on them in arbitrary order deadlocked with the writer's batch lock.
    """
    held = (
        select(Request.id)
        .where(Request.id.in_(request_ids), Request.status == RequestStatus.RUNNING)
        .with_for_update(skip_locked=True)
    )
    session.execute(
        update(Request)
        .where(Request.id.in_(held.scalar_subquery()))
        .values(published_at=now)
        .execution_options(synchronize_session=False)
    )
