"""Wire shapes of the native API, apart from the table models."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from core.enums import JobStatus, Priority, RequestStatus, TaskKind
from storage.jobs import Progress
from storage.tables import Job, Request, as_utc


class ValidationIssue(BaseModel):
    """One of FastAPI's validation errors: where (``loc``), what (``msg``) and its kind."""

    model_config = ConfigDict(extra="allow")

    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """The native API's error body: a sentence naming the field, or a list of issues."""

    detail: str | list[ValidationIssue]


# The error answers every native route may give, documented once for the OpenAPI spec.
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "The body could not be read (not UTF-8 JSON)."},
    401: {"model": Problem, "description": "No API key, or not a valid one."},
    404: {"model": Problem, "description": "Not found; another tenant's id reads as absent."},
    413: {"model": Problem, "description": "The body is over the size limit."},
    422: {"model": Problem, "description": "Invalid input; the message names the field."},
    429: {"model": Problem, "description": "Too busy; retry after ``Retry-After`` seconds."},
    503: {"model": Problem, "description": "The database is unavailable; nothing was accepted."},
}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Latency(BaseModel):
    queue_s: float | None
    ttft_s: float | None
    total_s: float | None


class RequestPublic(BaseModel):
    id: uuid.UUID
    object: str = "inferq.request"
    status: RequestStatus
    task: TaskKind
    model: str
    priority: Priority
    output: Any = None
    error: str | None = None
    usage: Usage | None = None
    latency: Latency
    attempts: int
    created_at: datetime
    finished_at: datetime | None = None
    # The model the request was routed to first, and why it moved down the route's chain.
    first_model: str | None = None
    fallback_reason: str | None = None

    @classmethod
    def of(cls, row: Request) -> RequestPublic:
        usage = None
        if row.prompt_tokens is not None:
            completion = row.completion_tokens or 0
            usage = Usage(
                prompt_tokens=row.prompt_tokens,
                completion_tokens=completion,
                total_tokens=row.prompt_tokens + completion,
            )
        return cls(
            id=row.id,
            status=row.status,
            task=row.task,
            model=row.model,
            priority=row.priority,
            output=row.output,
            error=row.error,
            usage=usage,
            latency=Latency(
                queue_s=_seconds(row.created_at, row.started_at),
                ttft_s=_seconds(row.created_at, row.first_token_at),
                total_s=_seconds(row.created_at, row.finished_at),
            ),
            attempts=row.attempts,
            created_at=row.created_at,
            finished_at=row.finished_at,
            first_model=row.first_model,
            fallback_reason=row.fallback_reason,
        )


class ModelPublic(BaseModel):
    id: str
    object: str = "model"
    engine: str
    max_model_len: int
    queue: str


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelPublic]


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((as_utc(end) - as_utc(start)).total_seconds(), 6)


class JobPublic(BaseModel):
    id: uuid.UUID
    object: str = "inferq.job"
    status: JobStatus
    task: TaskKind
    model: str | None
    total: int
    invalid: int
    counts: dict[str, int]
    requests_per_s: float | None
    eta_s: float | None
    created_at: datetime
    cancelled_at: datetime | None

    @classmethod
    def of(cls, job: Job, progress: Progress) -> JobPublic:
        counts = {status.value: progress.counts.get(status, 0) for status in RequestStatus}
        return cls(
            id=job.id,
            status=progress.status,
            task=job.task,
            model=job.model,
            total=job.total,
            invalid=job.invalid,
            counts=counts,
            requests_per_s=progress.requests_per_s,
            eta_s=progress.eta_s,
            created_at=job.created_at,
            cancelled_at=job.cancelled_at,
        )


class JobList(BaseModel):
    object: str = "list"
    data: list[JobPublic]


def result_line(row: Request) -> dict[str, Any]:
    """One line of a job's results file, keyed by the caller's item id."""
    usage = None
    if row.prompt_tokens is not None:
        usage = {"prompt_tokens": row.prompt_tokens, "completion_tokens": row.completion_tokens}
    return {
        "id": row.item_id,
        "line": row.line,
        "status": row.status.value,
        "output": row.output,
        "error": row.error,
        "model": row.model,
        "usage": usage,
    }
