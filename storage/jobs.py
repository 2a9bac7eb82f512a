"""Bulk jobs: progress from their requests, cancelling, results in input order."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from core.enums import OPEN_STATUSES, JobStatus, RequestStatus
from storage.reconcile import DEADLINE_PASSED
from storage.tables import Job, JobError, Request, as_utc, utcnow

RESULT_CHUNK = 1000


@dataclass(frozen=True, slots=True)
class Progress:
    status: JobStatus
    counts: dict[RequestStatus, int]
    done: int
    requests_per_s: float | None
    eta_s: float | None


def get_job(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job | None:
    """A job by id, only if it belongs to this tenant."""
    return session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))


def list_jobs(session: Session, tenant_id: uuid.UUID, *, limit: int = 50) -> list[Job]:
    query = select(Job).where(Job.tenant_id == tenant_id).order_by(Job.created_at.desc())
    return list(session.scalars(query.limit(limit)))


def progress(session: Session, job: Job) -> Progress:
    """Counts by status, throughput so far and an estimated time to finish."""
    rows = session.execute(
        select(Request.status, func.count(), func.max(Request.finished_at))
        .where(Request.job_id == job.id)
        .group_by(Request.status)
    ).all()
    counts = {status: int(count) for status, count, _ in rows}
    last = max((as_utc(at) for _, _, at in rows if at is not None), default=None)
    done = sum(n for status, n in counts.items() if status.terminal)
    running = counts.get(RequestStatus.RUNNING, 0)
    open_ = counts.get(RequestStatus.QUEUED, 0) + running
    if job.cancelled_at is not None:
        status = JobStatus.CANCELLING if running else JobStatus.CANCELLED
    elif job.status in (JobStatus.VALIDATING, JobStatus.FAILED):
        status = job.status  # lines still being admitted, or none of them was valid
    elif not open_ and counts.get(RequestStatus.EXPIRED):
        status = JobStatus.EXPIRED
    else:
        status = JobStatus.IN_PROGRESS if open_ else JobStatus.COMPLETED
    rate = None
    if done and last is not None:
        elapsed = ((last if not open_ else utcnow()) - as_utc(job.created_at)).total_seconds()
        rate = done / elapsed if elapsed > 0 else None
    eta = open_ / rate if rate and status is JobStatus.IN_PROGRESS else None
    return Progress(status, counts, done, rate, eta)


def cancel(session: Session, job: Job, at: datetime) -> int:
    """Cancel what has not finished; a worker running one of them aborts it (a continuous
    engine at its next step; a static batch runs to its end). Returns how many were cancelled."""
    if job.cancelled_at is None:
        job.cancelled_at = at
    result = session.execute(
        update(Request)
        .where(Request.job_id == job.id, Request.status.in_(OPEN_STATUSES))
        .values(status=RequestStatus.CANCELLED, finished_at=at)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def expire_overdue(session: Session, job: Job, at: datetime) -> int:
    """Past the job's deadline, what has not started expires (running batches finish)."""
    if job.deadline_at is None or as_utc(job.deadline_at) > at:
        return 0
    result = session.execute(
        update(Request)
        .where(Request.job_id == job.id, Request.status == RequestStatus.QUEUED)
        .values(status=RequestStatus.EXPIRED, finished_at=at, error=DEADLINE_PASSED)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def results(session: Session, job_id: uuid.UUID) -> Iterator[Request]:
    """The job's requests in input order, read in chunks."""
    query = select(Request).where(Request.job_id == job_id).order_by(Request.line)
    yield from session.scalars(query.execution_options(yield_per=RESULT_CHUNK))


def errors(session: Session, job_id: uuid.UUID) -> list[JobError]:
    query = select(JobError).where(JobError.job_id == job_id).order_by(JobError.line)
    return list(session.scalars(query))
