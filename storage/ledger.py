"""Writing a batch's results and ledger rows: one transaction, first success wins."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import JSON, Text, and_, bindparam, case, func, literal, or_, select, text, update
from sqlalchemy.orm import Session

from core.enums import OPEN_STATUSES, Outcome, RequestStatus, TaskKind
from storage.bulk import insert_rows
from storage.reconcile import DEADLINE_PASSED
from storage.tables import LedgerEntry, Request


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
    # The engine call ran past the model's timeout_s (the ledger says timed_out, not failed).
    timed_out: bool = False
    # A failed attempt with models left in its chain moves the request to ``fallbacks[0]``.
    fallbacks: tuple[str, ...] = ()
    # Set when the model itself is next in ``fallbacks``: a retry, published after this delay.
    retry_in_s: float | None = None
    # Seconds from the request's creation (its commit) to its first token leaving the worker:
    # the time to first token the client sees, queue included (``ttft_s`` is the engine's).
    client_ttft_s: float | None = None
    # What admission reserved of the tenant's tokens per minute for its output (max_tokens
    # x n) and when (the message's enqueue time), for tasks.budget to settle once it ends.
    reserved_tokens: int = 0
    reserved_at: float | None = None

    @property
    def falls_back(self) -> bool:
        return not self.succeeded and bool(self.fallbacks)


def claim(
    session: Session,
    request_ids: Sequence[uuid.UUID],
    at: datetime,
    *,
    running_lease: timedelta,
    max_deliveries: int,
    worker: str | None = None,
) -> set[uuid.UUID]:
    """Mark a batch's requests running and return those to run.

    A request is claimed while ``queued``, or while ``running`` under a lease nobody renewed
    for ``running_lease`` (its worker died and the message came back); one that a live worker
    runs, or that was cancelled or finished since it was published, is left out. Past their
    deadline requests are marked expired instead, and a request delivered more than
    ``max_deliveries`` times is failed with the reason: it is likely what kills workers.
    """
    r = _REQUESTS.c  # Core, not the ORM: this runs once a batch, on the executor's thread
    claimable = and_(
        r.id.in_(request_ids),
        or_(
            r.status == RequestStatus.QUEUED,
            and_(
                r.status == RequestStatus.RUNNING,
                r.published_at < at - running_lease,
            ),
        ),
    )
    # One statement: past its deadline a request is expired, else claimed.
    expired = and_(r.deadline_at.is_not(None), r.deadline_at <= at)

    def unless_expired(column: Any, claimed: Any) -> Any:
        return case((expired, column), else_=claimed)

    changed = session.execute(
        update(_REQUESTS)
        .where(claimable)
        .values(
            status=case(
                (expired, _status(RequestStatus.EXPIRED)), else_=_status(RequestStatus.RUNNING)
            ),
            finished_at=case((expired, at), else_=r.finished_at),
            error=case((expired, DEADLINE_PASSED), else_=r.error),
            started_at=unless_expired(r.started_at, at),
            published_at=unless_expired(r.published_at, at),
            deliveries=unless_expired(r.deliveries, r.deliveries + 1),
            claimed_by=unless_expired(r.claimed_by, literal(worker, r.claimed_by.type)),
        )
        .returning(r.id, r.deliveries, r.status)
        .execution_options(synchronize_session=False)
    ).all()
    rows = [(request_id, n) for request_id, n, status in changed if status == RequestStatus.RUNNING]
    worn = [request_id for request_id, deliveries in rows if deliveries > max_deliveries]
    if worn:
        session.execute(
            update(_REQUESTS)
            .where(r.id.in_(worn))
            .values(
                status=RequestStatus.FAILED,
                finished_at=at,
                error=f"delivered more than {max_deliveries} times without finishing; "
                "it may be what stops the workers running it",
            )
            .execution_options(synchronize_session=False)
        )
    return {request_id for request_id, deliveries in rows if deliveries <= max_deliveries}


def _status(status: RequestStatus) -> Any:
    return literal(status, _REQUESTS.c.status.type)


def hand_back(
    session: Session,
    request_ids: Sequence[uuid.UUID],
    at: datetime,
    *,
    worker: str | None,
    ran: bool,
) -> set[uuid.UUID]:
    """A stopping worker gives back requests it holds and return those to publish again now.

    Queued ones (received, never claimed) and running ones this ``worker`` claimed go back to
    ``queued`` with a fresh lease; one it never started (``ran`` false) does not count as a
    delivery. A request another worker claimed meanwhile, or that finished, is left alone.
    """
    mine = and_(Request.status == RequestStatus.RUNNING, Request.claimed_by == worker)
    deliveries: Any = Request.deliveries
    if not ran:
        deliveries = case((mine, Request.deliveries - 1), else_=Request.deliveries)
    rows = session.execute(
        update(Request)
        .where(Request.id.in_(request_ids), or_(Request.status == RequestStatus.QUEUED, mine))
        .values(status=RequestStatus.QUEUED, published_at=at, deliveries=deliveries)
        .returning(Request.id)
        .execution_options(synchronize_session=False)
    )
    return set(rows.scalars())


def record_batch(session: Session, attempts: Sequence[Attempt]) -> list[Outcome]:
    """Write results and ledger rows for a batch; return each attempt's outcome.

    A request already in a terminal state keeps its first result: this attempt is recorded
    as a duplicate, so every execution is accounted for. A failed attempt with fallbacks left
    is not a result: the request goes back to ``queued`` on the next model of its chain, with
    the reason appended to ``fallback_reason``, and the caller publishes it after the commit.
    """
    ids = [a.request_id for a in attempts]
    rows = session.execute(
        select(Request.id, Request.status)
        .where(Request.id.in_(ids), Request.status.not_in(OPEN_STATUSES))
        .with_for_update()
    )
    closed = {request_id: status for request_id, status in rows}
    outcomes = _outcomes(attempts, closed)
    fresh = [a for a, o in zip(attempts, outcomes, strict=True) if o in _RESULTS]
    results = [a for a in fresh if not a.falls_back]
    if results:
        _write_results(session, results)
    moved = [a for a in fresh if a.falls_back]
    if moved:
        session.execute(_FALLBACK_UPDATE, [_fallback_params(a) for a in moved])
    insert_rows(
        session,
        LedgerEntry.__table__,
        [_ledger_row(a, o) for a, o in zip(attempts, outcomes, strict=True)],
    )
    return outcomes


def _write_results(session: Session, results: Sequence[Attempt]) -> None:
    """Store each request's result, if it is still open. On Postgres one statement for the
    whole group (its values as arrays, ``unnest``), where an executemany is a statement a
    request on the server; elsewhere the executemany."""
    params = [_result_params(a) for a in results]
    dialect = session.get_bind().dialect
    if dialect.name != "postgresql":
        session.execute(_RESULT_UPDATE, params)
        return
    processors = {
        key: column.type._cached_bind_processor(dialect) for key, column in _RESULT_COLUMNS.items()
    }
    arrays = {
        key: [p[key] if (process := processors[key]) is None else process(p[key]) for p in params]
        for key in _RESULT_COLUMNS
    }
    session.execute(_RESULT_UNNEST, arrays)


def _outcomes(attempts: Sequence[Attempt], closed: dict[uuid.UUID, RequestStatus]) -> list[Outcome]:
    """First attempt wins: one at a request already closed, or already attempted earlier in
    this batch (the same message delivered twice and batched together), is a duplicate; one
    at a request cancelled (or expired) while it ran is charged to that."""
    seen = set(closed)
    outcomes = []
    for a in attempts:
        if a.request_id not in seen:
            outcomes.append(Outcome.SUCCEEDED if a.succeeded else Outcome.FAILED)
        else:
            status = closed.get(a.request_id)
            outcomes.append(
                _STOPPED.get(status, Outcome.DUPLICATE) if status else Outcome.DUPLICATE
            )
        seen.add(a.request_id)
    return outcomes


_RESULTS = (Outcome.SUCCEEDED, Outcome.FAILED)  # the attempts that set a request's result
_STOPPED = {RequestStatus.CANCELLED: Outcome.CANCELLED, RequestStatus.EXPIRED: Outcome.TIMED_OUT}


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


# The same update as one statement on Postgres: each column's values as an array.
_RESULT_COLUMNS = {
    "b_id": _REQUESTS.c.id,
    "b_status": _REQUESTS.c.status,
    "b_output": _REQUESTS.c.output,
    "b_error": _REQUESTS.c.error,
    "b_prompt_tokens": _REQUESTS.c.prompt_tokens,
    "b_completion_tokens": _REQUESTS.c.completion_tokens,
    "b_finish_reason": _REQUESTS.c.finish_reason,
    "b_started_at": _REQUESTS.c.started_at,
    "b_first_token_at": _REQUESTS.c.first_token_at,
    "b_finished_at": _REQUESTS.c.finished_at,
}
_ARRAY_TYPES = {
    "b_id": "uuid[]",
    "b_output": "json[]",
    "b_prompt_tokens": "integer[]",
    "b_completion_tokens": "integer[]",
    "b_started_at": "timestamptz[]",
    "b_first_token_at": "timestamptz[]",
    "b_finished_at": "timestamptz[]",
}
_RESULT_UNNEST = text(
    "UPDATE requests AS r SET status = v.b_status, output = v.b_output, error = v.b_error, "
    "prompt_tokens = v.b_prompt_tokens, completion_tokens = v.b_completion_tokens, "
    "finish_reason = v.b_finish_reason, started_at = v.b_started_at, "
    "first_token_at = v.b_first_token_at, finished_at = v.b_finished_at, "
    "attempts = r.attempts + 1 FROM unnest("
    + ", ".join(f"CAST(:{key} AS {_ARRAY_TYPES.get(key, 'text[]')})" for key in _RESULT_COLUMNS)
    + ") AS v("
    + ", ".join(_RESULT_COLUMNS)
    + ") WHERE r.id = v.b_id AND r.status IN ("
    + ", ".join(f"'{status.value}'" for status in OPEN_STATUSES)
    + ")"
)


_FALLBACK_UPDATE = (
    update(_REQUESTS)
    .where(
        _REQUESTS.c.id == bindparam("b_id"),
        or_(*(_REQUESTS.c.status == status for status in OPEN_STATUSES)),
    )
    .values(
        status=RequestStatus.QUEUED,
        model=bindparam("b_model"),
        fallbacks=bindparam("b_fallbacks", type_=JSON),
        fallback_reason=func.coalesce(_REQUESTS.c.fallback_reason + "; ", "")
        + bindparam("b_reason", type_=Text),
        first_model=func.coalesce(_REQUESTS.c.first_model, bindparam("b_first_model")),
        started_at=None,
        published_at=bindparam("b_published_at"),  # published right after this commit
        deliveries=0,  # a new model: its delivery cap starts over
        attempts=_REQUESTS.c.attempts + 1,
    )
)


def _fallback_params(a: Attempt) -> dict[str, Any]:
    what = "timed out" if a.timed_out else "failed"
    return {
        "b_id": a.request_id,
        "b_model": a.fallbacks[0],
        "b_fallbacks": list(a.fallbacks[1:]) or None,
        "b_reason": f"{a.model} {what}: {a.error}",
        "b_first_model": a.model,
        "b_published_at": a.finished_at,
    }


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
        "client_ttft_s": a.client_ttft_s,
        "gpu_seconds": a.gpu_seconds,
        "cost": a.cost,
        "outcome": Outcome.TIMED_OUT if a.timed_out and outcome is Outcome.FAILED else outcome,
        "error": a.error,
        "created_at": a.finished_at,
    }
