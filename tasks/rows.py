"""A request row as the message that runs it: the one mapping from what Postgres keeps to what a
worker receives.

Submitting publishes a committed request with it (passing what it rendered and whether the
client streams, which no row keeps); the reconciler re-publishes what the transport lost, and a
worker runs a request ahead of its message (fair turns between tenants, see
``workers.fairness``), both from the row alone. A message rebuilt from a row does not stream
tokens (streaming is best effort; the API falls back to the committed record) and counts as
the first try on its model.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from core.enums import RequestStatus
from storage.tables import Request, as_utc
from tasks.contract import EngineRequest, RunMessage
from tasks.templates import SamplingIn, render


def run_message(
    row: Request | Mapping[str, Any],
    *,
    engine_request: EngineRequest | None = None,
    stream: bool = False,
    enqueued_at: float | None = None,
) -> RunMessage:
    """The message for a stored request.

    Args:
        row: The row, or the column values a bulk insert wrote for it.
        engine_request: What the submitter rendered for it; else rendered again from the
            row's input and params (``ValueError`` if they no longer render).
        stream: The client reads tokens as they come.
        enqueued_at: When the row was committed (Unix time); else its ``created_at``.
    """
    column = row.get if isinstance(row, Mapping) else functools.partial(getattr, row)
    if engine_request is None:
        params = SamplingIn.model_validate(column("params"))
        engine_request = render(column("task"), column("input"), params)
    job_id = column("job_id")
    return RunMessage(
        request_id=str(column("id")),
        tenant_id=str(column("tenant_id")),
        model=column("model"),
        task=column("task"),
        priority=column("priority"),
        engine_request=engine_request,
        enqueued_at=as_utc(column("created_at")).timestamp()
        if enqueued_at is None
        else enqueued_at,
        job_id=str(job_id) if job_id else None,
        webhook_url=column("webhook_url"),
        fallbacks=column("fallbacks") or None,
        stream=stream,
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
