"""The OpenAI Batch API over native jobs: a job per batch, its status read from the job.

A batch's status is read from its job's progress each time it is read: past the completion
window, what has not started expires first (``storage.jobs.expire_overdue``). A small file is
validated before the batch is answered; a large one is answered ``validating`` and admitted
in the background (``api.admission``), ``in_progress`` from its first admitted line. Output
files are written on demand (``api.openai_files``), so ``completed`` follows ``in_progress``
without a ``finalizing`` wait.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from api.jsonl import count_lines
from api.openai_endpoints import TASKS
from api.openai_errors import ApiError
from api.openai_lines import OPENAI, prepare_lines, refusals
from api.openai_schemas import (
    BatchCreate,
    BatchErrorItem,
    BatchErrors,
    BatchList,
    BatchObject,
    BatchStatus,
    RequestCounts,
    list_ends,
    unix,
)
from core.enums import JobStatus, RequestStatus
from storage import jobs
from storage import openai_files as store
from storage.events import close_finished_jobs
from storage.tables import Job, JobError, utcnow
from submission.services import Services
from submission.submit import submit_job
from tasks.webhooks import publish_deliveries

WINDOW = re.compile(r"^([1-9][0-9]{0,5})([smh])$")
WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600}
MAX_WINDOW = timedelta(days=7)
STATUSES: dict[JobStatus, BatchStatus] = {
    JobStatus.VALIDATING: "in_progress",  # lines admitted so far are running
    JobStatus.IN_PROGRESS: "in_progress",
    JobStatus.CANCELLING: "cancelling",
    JobStatus.CANCELLED: "cancelled",
    JobStatus.COMPLETED: "completed",
    JobStatus.EXPIRED: "expired",
    JobStatus.FAILED: "failed",
}
ENDED = ("completed", "expired", "cancelled")
ENDED_WITHOUT_OUTPUT = (RequestStatus.FAILED, RequestStatus.EXPIRED, RequestStatus.CANCELLED)
STAMPS = {
    "in_progress": ("in_progress_at",),
    "completed": ("finalizing_at", "completed_at"),
    "expired": ("expired_at",),
    "cancelling": ("cancelling_at",),
    "cancelled": ("cancelling_at", "cancelled_at"),
}


def parse_window(text: str) -> timedelta:
    """``24h`` is the only window OpenAI documents; inferq also takes ``<n>s``, ``<n>m`` and
    ``<n>h`` up to seven days, so short deadlines can be used (and tested)."""
    match = WINDOW.match(text)
    window = timedelta(seconds=int(match[1]) * WINDOW_UNITS[match[2]]) if match else None
    if window is None or window > MAX_WINDOW:
        raise ApiError(
            400,
            f"completion_window {text!r} is not supported; use '24h' (or <n>s, <n>m, <n>h "
            f"up to {MAX_WINDOW.days} days)",
            param="completion_window",
        )
    return window


def create_batch(services: Services, tenant_id: uuid.UUID, body: BatchCreate) -> BatchObject:
    """Validate every line, then write the job, its requests, its refused lines and the batch
    in one commit. A file with no good line makes a ``failed`` batch and runs nothing."""
    if body.endpoint not in TASKS:
        supported = ", ".join(TASKS)
        raise ApiError(
            400,
            f"endpoint {body.endpoint!r} is not supported; use one of {supported}",
            param="endpoint",
        )
    window = parse_window(body.completion_window)
    settings = services.settings
    with services.sessions() as session:
        upload = store.get_file(session, tenant_id, body.input_file_id)
        if upload is None or upload.purpose != "batch":
            raise ApiError(400, f"no batch file {body.input_file_id!r}", param="input_file_id")
        slices = store.content_slices(session, upload.id, upload.size, store.SLICE_BYTES)
        lines = count_lines(slices, limit=settings.max_job_lines)  # read a slice at a time
        data = upload.content if lines <= settings.inline_job_lines else None
    now = utcnow()
    if data is None:
        return _create_validating(services, tenant_id, body, now=now)
    prepared, errors = prepare_lines(services, tenant_id, data, endpoint=body.endpoint)
    batch = store.Batch(
        id=store.new_batch_id(),
        tenant_id=tenant_id,
        input_file_id=body.input_file_id,
        endpoint=body.endpoint,
        completion_window=body.completion_window,
        meta=body.metadata,
        created_at=now,
        expires_at=now + window,
    )
    if not prepared:
        batch.status, batch.failed_at, batch.errors = "failed", now, refusals(errors)
        with services.sessions.begin() as session:
            session.add(batch)
            deliveries = store.batch_event(
                session, tenant_id=tenant_id, batch_id=batch.id, status=JobStatus.FAILED
            )
        publish_deliveries(services.celery, deliveries)
        return get_batch(services, tenant_id, batch.id)
    if services.limits is not None:  # 429, like any other way in
        services.limits.admit(prepared)
    models = {item.model for item in prepared}
    job = Job(
        id=uuid.uuid4(),
        tenant_id=tenant_id,
        task=TASKS[body.endpoint],
        model=models.pop() if len(models) == 1 else None,
        shared={"openai_batch": batch.id, "endpoint": body.endpoint},
        total=len(prepared),
        invalid=len(errors),
        created_at=now,
        deadline_at=batch.expires_at,
    )
    batch.job_id, batch.in_progress_at = job.id, now
    refused = [
        JobError(job_id=job.id, line=e.line, item_id=e.item_id, message=e.message) for e in errors
    ]
    submit_job(services, prepared, job=job, extra=[*refused, batch], deadline_at=batch.expires_at)
    return get_batch(services, tenant_id, batch.id)


def _create_validating(
    services: Services,
    tenant_id: uuid.UUID,
    body: BatchCreate,
    *,
    now: datetime,
) -> BatchObject:
    """A large file: copy it (inside the database) to the job's source and answer
    ``validating``; ``api.admission`` checks and runs it."""
    expires_at = now + parse_window(body.completion_window)
    job = Job(
        id=uuid.uuid4(),
        tenant_id=tenant_id,
        task=TASKS[body.endpoint],
        status=JobStatus.VALIDATING,
        created_at=now,
        deadline_at=expires_at,
    )
    batch = store.Batch(
        id=store.new_batch_id(),
        tenant_id=tenant_id,
        job_id=job.id,
        input_file_id=body.input_file_id,
        endpoint=body.endpoint,
        completion_window=body.completion_window,
        meta=body.metadata,
        created_at=now,
        expires_at=expires_at,
    )
    job.shared = {"openai_batch": batch.id, "endpoint": body.endpoint}
    with services.sessions.begin() as session:
        session.add(job)
        session.flush()
        if not store.copy_to_source(session, body.input_file_id, job.id, format=OPENAI):
            raise ApiError(400, f"no batch file {body.input_file_id!r}", param="input_file_id")
        session.add(batch)
    return get_batch(services, tenant_id, batch.id)


def get_batch(services: Services, tenant_id: uuid.UUID, batch_id: str) -> BatchObject:
    deliveries: list[uuid.UUID] = []
    with services.sessions.begin() as session:
        batch = _owned_batch(session, tenant_id, batch_id)
        public = batch_public(session, batch, utcnow(), closed=deliveries)
    publish_deliveries(services.celery, deliveries)
    return public


def list_batches(
    services: Services, tenant_id: uuid.UUID, *, after: str | None, limit: int
) -> BatchList:
    deliveries: list[uuid.UUID] = []
    with services.sessions.begin() as session:
        rows = store.list_batches(session, tenant_id, after=after, limit=limit + 1)
        now = utcnow()
        data = [batch_public(session, row, now, closed=deliveries) for row in rows[:limit]]
    publish_deliveries(services.celery, deliveries)
    return BatchList(data=data, has_more=len(rows) > limit, **list_ends(data))


def cancel_batch(services: Services, tenant_id: uuid.UUID, batch_id: str) -> BatchObject:
    """Lines not yet started are cancelled; running ones finish (``cancelling`` until then)."""
    deliveries: list[uuid.UUID] = []
    with services.sessions.begin() as session:
        batch = _owned_batch(session, tenant_id, batch_id)
        now = utcnow()
        current = batch_public(session, batch, now)
        if current.status in ("completed", "failed", "expired"):
            raise ApiError(400, f"batch {batch_id} is {current.status}; it cannot be cancelled")
        if current.status in ("validating", "in_progress"):
            job = session.get(Job, batch.job_id)
            assert job is not None
            jobs.cancel(session, job, now)
            deliveries += close_finished_jobs(session, [job.id], now)
        public = batch_public(session, batch, now)
    publish_deliveries(services.celery, deliveries)
    return public


def _owned_batch(session: Session, tenant_id: uuid.UUID, batch_id: str) -> store.Batch:
    batch = store.get_batch(session, tenant_id, batch_id)
    if batch is None:
        raise ApiError(404, f"no batch {batch_id!r}", param="batch_id")
    return batch


def batch_public(
    session: Session, batch: store.Batch, now: datetime, *, closed: list[uuid.UUID] | None = None
) -> BatchObject:
    """The batch as the API shows it, recording when each status was first seen.

    Past its window, what has not started expires here; the job then closes, and the events
    this queues (``batch.expired``) are added to ``closed``, to publish after the commit.
    """
    if batch.job_id is None or batch.status == "failed":
        return _failed_public(batch)
    job = session.get(Job, batch.job_id)
    assert job is not None
    if jobs.expire_overdue(session, job, now) and closed is not None:
        closed += close_finished_jobs(session, [job.id], now)
    progress = jobs.progress(session, job)
    status = STATUSES[progress.status]
    if progress.status is JobStatus.VALIDATING and not job.total:
        status = "validating"  # no line admitted yet
    for stamp in STAMPS.get(status, ()):
        if getattr(batch, stamp) is None:
            setattr(batch, stamp, now)
    ok = progress.counts.get(RequestStatus.SUCCEEDED, 0)
    total = job.total + job.invalid
    failed = job.invalid + sum(progress.counts.get(s, 0) for s in ENDED_WITHOUT_OUTPUT)
    ended = status in ENDED
    hex_id = batch.id.removeprefix("batch_")
    return BatchObject(
        **_common(batch),
        model=job.model,
        status=status,
        output_file_id=f"file-{hex_id}-output" if ended and ok else None,
        error_file_id=f"file-{hex_id}-errors" if ended and failed else None,
        request_counts=RequestCounts(total=total, completed=ok, failed=failed),
    )


def _failed_public(batch: store.Batch) -> BatchObject:
    refusals = batch.errors or {}
    lines = int(refusals.get("lines", 0))
    items = [BatchErrorItem.model_validate(item) for item in refusals.get("data", [])]
    return BatchObject(
        **_common(batch),
        status="failed",
        errors=BatchErrors(data=items),
        request_counts=RequestCounts(total=lines, completed=0, failed=lines),
    )


def _common(batch: store.Batch) -> dict[str, Any]:
    return {
        "id": batch.id,
        "endpoint": batch.endpoint,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "metadata": batch.meta,
        "created_at": unix(batch.created_at) or 0,
        **{
            stamp: unix(getattr(batch, stamp))
            for stamp in (
                "in_progress_at",
                "expires_at",
                "finalizing_at",
                "completed_at",
                "failed_at",
                "expired_at",
                "cancelling_at",
                "cancelled_at",
            )
        },
    }
