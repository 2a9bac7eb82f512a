"""``POST /v1/chat/completions``: enqueue one request at interactive priority and wait for it.

The request takes the normal path (validate, group commit, publish), so it is queued, batched,
retried and accounted like any other; the caller just does not see the queue. The wait is
bounded: past it the answer is a 504 naming the request id, which keeps running and can be
read with ``GET /v1/requests/{id}``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

from fastapi.concurrency import run_in_threadpool

from api.committer import GroupCommitter
from api.openai_errors import ApiError
from api.openai_schemas import ChatCompletion, ChatCompletionBody
from api.service import Services, prepare
from inferq.enums import Priority, RequestStatus
from storage.models import Request
from storage.requests import get_for_tenant

CHAT_WAIT_S = 600.0
FIRST_PAUSE_S = 0.01
MAX_PAUSE_S = 0.25


async def complete(
    services: Services,
    committer: GroupCommitter,
    tenant_id: uuid.UUID,
    body: ChatCompletionBody,
    *,
    disconnected: Callable[[], Awaitable[bool]],
) -> ChatCompletion:
    """Submit the chat and answer its completion once a worker has written it."""
    if body.model not in services.config.models:
        known = ", ".join(sorted(services.config.models))
        raise ApiError(
            404,
            f"model {body.model!r} is not configured; configured: {known}",
            code="model_not_found",
            param="model",
        )
    native = body.to_native(Priority.INTERACTIVE)
    prepared = await run_in_threadpool(prepare, services, tenant_id, native)
    row, _created = await asyncio.wrap_future(committer.submit(prepared))
    row = await _wait(services, tenant_id, row.id, disconnected)
    if row.status is RequestStatus.SUCCEEDED:
        return ChatCompletion.of(row)
    if not row.status.terminal:
        raise ApiError(
            504,
            f"no result within {CHAT_WAIT_S:.0f}s; request {row.id} is still {row.status.value} "
            f"(GET /v1/requests/{row.id} reads it later)",
            code="timeout",
        )
    raise ApiError(500, f"request {row.id} {row.status.value}: {row.error}", code="engine_error")


async def _wait(
    services: Services,
    tenant_id: uuid.UUID,
    request_id: uuid.UUID,
    disconnected: Callable[[], Awaitable[bool]],
) -> Request:
    deadline = time.monotonic() + CHAT_WAIT_S
    pause = FIRST_PAUSE_S
    while True:
        row = await run_in_threadpool(_load, services, tenant_id, request_id)
        if row.status.terminal or time.monotonic() >= deadline:
            return row
        if await disconnected():
            raise ApiError(499, "the client closed the request", code="client_closed")
        await asyncio.sleep(min(pause, max(deadline - time.monotonic(), 0)))
        pause = min(pause * 2, MAX_PAUSE_S)


def _load(services: Services, tenant_id: uuid.UUID, request_id: uuid.UUID) -> Request:
    with services.sessions() as session:
        row = get_for_tenant(session, tenant_id, request_id)
    assert row is not None  # committed before the wait began
    return row
