"""Completion events: a request with a webhook finished, a job has nothing left to run.

Called inside the transaction that records the results, so an event exists exactly when its
result does; the caller publishes the returned deliveries after the commit.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import exists, func, select, update

from core.enums import OPEN_STATUSES, JobStatus, Outcome
from storage.jobs import progress
from storage.openai_files import batch_event
from storage.tables import Job, Request
from storage.webhooks import enqueue_delivery


def request_completed(
    session: Any, finished: Iterable[tuple[uuid.UUID, uuid.UUID, str, Outcome]]
) -> list[uuid.UUID]:
    """Queue ``request.completed`` for (request, tenant, webhook URL, outcome) just recorded.

    Duplicates are not announced again: the first result was.
    """
    deliveries = []
    for request_id, tenant_id, url, outcome in finished:
        if outcome not in (Outcome.SUCCEEDED, Outcome.FAILED):
            continue
        row = session.get(Request, request_id)
        payload = {
            "id": str(request_id),
            "status": row.status.value,
            "task": row.task.value,
            "model": row.model,
            "output": row.output,
            "error": row.error,
            "usage": {
                "prompt_tokens": row.prompt_tokens,
                "completion_tokens": row.completion_tokens,
            },
        }
        deliveries.append(
            enqueue_delivery(
                session,
                tenant_id=tenant_id,
                url=url,
                event_type="request.completed",
                payload=payload,
            )
        )
    return deliveries


def _one_closer(session: Any, job_id: uuid.UUID) -> None:
    """Two workers committing a job's last requests at once would each see the other's still
    open (neither has committed) and neither would stamp the job (seen with 16 workers). On
    Postgres a transaction lock per job makes the second wait; its next statement's snapshot
    then sees the first's results. A lock apart from the job's row: a cancel holds that row
    while it updates the job's requests, which a committing worker holds. SQLite runs one
    writer at a time anyway."""
    if session.get_bind().dialect.name == "postgresql":
        key = int.from_bytes(job_id.bytes[:8], "big", signed=True)
        session.execute(select(func.pg_advisory_xact_lock(key)))


def close_finished_jobs(
    session: Any, job_ids: Iterable[uuid.UUID], at: datetime
) -> list[uuid.UUID]:
    """Stamp jobs with nothing left to run as finished, once, and queue ``job.completed``
    (and, for an OpenAI batch, ``batch.<status>`` to the tenant's endpoints)."""
    deliveries = []
    for job_id in sorted(set(job_ids)):
        _one_closer(session, job_id)
        still_open = exists().where(Request.job_id == job_id, Request.status.in_(OPEN_STATUSES))
        closed = session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.finished_at.is_(None),
                Job.status != JobStatus.VALIDATING,
                ~still_open,
            )
            .values(finished_at=at)
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        ).first()
        if closed is None:
            continue
        job = session.scalar(select(Job).where(Job.id == job_id))
        batch_id = (job.shared or {}).get("openai_batch")
        if batch_id is None and not job.webhook_url:
            continue
        state = progress(session, job)
        if batch_id is not None:  # the Batch API's own event, to the tenant's endpoints
            deliveries += batch_event(
                session, tenant_id=job.tenant_id, batch_id=batch_id, status=state.status
            )
        if job.webhook_url:
            payload = {
                "id": str(job.id),
                "status": state.status.value,
                "task": job.task.value,
                "total": job.total,
                "invalid": job.invalid,
                "counts": {s.value: n for s, n in state.counts.items()},
            }
            deliveries.append(
                enqueue_delivery(
                    session,
                    tenant_id=job.tenant_id,
                    url=job.webhook_url,
                    event_type="job.completed",
                    payload=payload,
                )
            )
    return deliveries
