"""Writing a batch's results and ledger rows: one transaction, first success wins."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, insert, or_, select, update
from sqlalchemy.orm import Session

from inferq.enums import OPEN_STATUSES, Outcome, RequestStatus, TaskKind
from storage.models import LedgerEntry, Request


@dataclass(frozen=True, slots=True)
class Attempt:
    """One execution of one request, as a worker saw it."""

    request_id: uuid.UUID
    tenant_id: uuid.UUID
    task: TaskKind
    model: str
    engine: str
    worker: str
    batch_id: uuid.UUID
    batch_size: int
    succeeded: bool
    output: Any
    error: str | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    queue_wait_s: float
    engine_s: float
    ttft_s: float | None
    gpu_seconds: float
    cost: float
    started_at: datetime
    first_token_at: datetime | None
    finished_at: datetime


def claim(session: Session, request_ids: Sequence[uuid.UUID], at: datetime) -> set[uuid.UUID]:
    """Mark a batch's requests running and return those to run.

    Requests past their deadline are marked expired and left out, as are those cancelled or
    finished since they were published. A request already ``running`` is claimed again: its
    message came back because the worker running it died.
    """
    session.execute(
        update(Request)
        .where(
            Request.id.in_(request_ids),
            Request.status.in_(OPEN_STATUSES),
            Request.deadline_at.is_not(None),
            Request.deadline_at <= at,
        )
        .values(status=RequestStatus.EXPIRED, finished_at=at, error="deadline passed before it ran")
        .execution_options(synchronize_session=False)
    )
    rows = session.execute(
        update(Request)
        .where(Request.id.in_(request_ids), Request.status.in_(OPEN_STATUSES))
        .values(status=RequestStatus.RUNNING, started_at=at)
        .returning(Request.id)
        .execution_options(synchronize_session=False)
    )
    return set(rows.scalars())


def record_batch(session: Session, attempts: Sequence[Attempt]) -> list[Outcome]:
    """Write results and ledger rows for a batch; return each attempt's outcome.

    A request already in a terminal state keeps its first result: this attempt is recorded
    as a duplicate, so every execution is accounted for.
    """
    ids = [a.request_id for a in attempts]
    closed = set(
        session.scalars(
            select(Request.id)
            .where(Request.id.in_(ids), Request.status.not_in(OPEN_STATUSES))
            .with_for_update()
        )
    )
    outcomes = [
        Outcome.DUPLICATE
        if a.request_id in closed
        else (Outcome.SUCCEEDED if a.succeeded else Outcome.FAILED)
        for a in attempts
    ]
    fresh = [a for a, o in zip(attempts, outcomes, strict=True) if o is not Outcome.DUPLICATE]
    if fresh:
        session.execute(_RESULT_UPDATE, [_result_params(a) for a in fresh])
    session.execute(
        insert(LedgerEntry),
        [_ledger_row(a, o) for a, o in zip(attempts, outcomes, strict=True)],
    )
    return outcomes


# A Core statement on the table: executemany with one parameter set per request.
_REQUESTS = Request.__table__
_RESULT_UPDATE = (
    update(_REQUESTS)
    .where(
        _REQUESTS.c.id == bindparam("b_id"),
        or_(*(_REQUESTS.c.status == status for status in OPEN_STATUSES)),
    )
    .values(
        status=bindparam("b_status"),
        output=bindparam("b_output"),
        error=bindparam("b_error"),
        prompt_tokens=bindparam("b_prompt_tokens"),
        completion_tokens=bindparam("b_completion_tokens"),
        finish_reason=bindparam("b_finish_reason"),
        started_at=bindparam("b_started_at"),
        first_token_at=bindparam("b_first_token_at"),
        finished_at=bindparam("b_finished_at"),
        attempts=_REQUESTS.c.attempts + 1,
    )
)


def _result_params(a: Attempt) -> dict[str, Any]:
    return {
        "b_id": a.request_id,
        "b_status": RequestStatus.SUCCEEDED if a.succeeded else RequestStatus.FAILED,
        "b_output": a.output,
        "b_error": a.error,
        "b_prompt_tokens": a.prompt_tokens,
        "b_completion_tokens": a.completion_tokens,
        "b_finish_reason": a.finish_reason,
        "b_started_at": a.started_at,
        "b_first_token_at": a.first_token_at,
        "b_finished_at": a.finished_at,
    }


def _ledger_row(a: Attempt, outcome: Outcome) -> dict[str, Any]:
    return {
        "request_id": a.request_id,
        "tenant_id": a.tenant_id,
        "task": a.task,
        "model": a.model,
        "engine": a.engine,
        "worker": a.worker,
        "batch_id": a.batch_id,
        "batch_size": a.batch_size,
        "prompt_tokens": a.prompt_tokens,
        "completion_tokens": a.completion_tokens,
        "queue_wait_s": a.queue_wait_s,
        "engine_s": a.engine_s,
        "ttft_s": a.ttft_s,
        "gpu_seconds": a.gpu_seconds,
        "cost": a.cost,
        "outcome": outcome,
        "error": a.error,
        "created_at": a.finished_at,
    }
