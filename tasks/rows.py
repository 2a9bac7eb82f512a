"""A stored request row back into the message the API sent for it: one mapping, used by the
reconciler (re-publishing what the transport lost) and by a worker running a request ahead of
its message (fair sharing between tenants, see workers.fairness).

A row keeps what the engine needs but not how the client reads the answer: a rebuilt message
does not stream tokens (streaming is best effort; the API falls back to the committed record)
and counts as the first try on its model.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from inferq.enums import RequestStatus
from storage.models import Request, as_utc
from tasks.contract import RunMessage
from tasks.templates import SamplingIn, render


def run_message(row: Request) -> RunMessage:
    """The message for this row; ValueError if its stored input no longer renders."""
    return RunMessage(
        request_id=str(row.id),
        tenant_id=str(row.tenant_id),
        model=row.model,
        task=row.task,
        priority=row.priority,
        engine_request=render(row.task, row.input, SamplingIn.model_validate(row.params)),
        enqueued_at=as_utc(row.created_at).timestamp(),
        deadline=as_utc(row.deadline_at).timestamp() if row.deadline_at else None,
        job_id=str(row.job_id) if row.job_id else None,
        webhook_url=row.webhook_url,
        fallbacks=row.fallbacks or None,
    )


def run_messages(rows: Iterable[Request], now: datetime) -> list[RunMessage]:
    """Messages for the rows that still render; a row stored before today's checks is failed
    in place (the caller's transaction) with the reason, and the others go on."""
    messages = []
    for row in rows:
        try:
            messages.append(run_message(row))
        except ValueError as exc:
            row.status, row.finished_at = RequestStatus.FAILED, now
            row.error = f"its parameters no longer pass the checks: {exc}"[:1000]
    return messages
