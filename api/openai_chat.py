"""``POST /v1/chat/completions``: enqueue one request at interactive priority and wait for it,
or, with ``stream: true``, follow it as Server-Sent Events in OpenAI's chunk format.

The request takes the normal path (validate, group commit, publish), so it is queued, batched,
retried and accounted like any other; the caller just does not see the queue. The wait is
bounded: past it the answer is a 504 naming the request id (in a stream, an error event), which
keeps running and can be read with ``GET /v1/requests/{id}``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi.concurrency import run_in_threadpool

from api.committer import GroupCommitter
from api.openai_errors import ApiError
from api.openai_schemas import (
    ChatCompletion,
    ChatCompletionBody,
    ChatCompletionChunk,
    ChunkChoice,
    ChunkDelta,
    CompletionUsage,
    completion_id,
    content_of,
    finish_reason_of,
    unix,
)
from api.streaming import STREAM_WAIT_S, event, sse
from api.waits import WaitSlots
from core.enums import Priority, RequestStatus
from router.config import model_kind_problem
from storage.requests import get_for_tenant
from storage.tables import Request
from submission.prepare import Prepared, prepare
from submission.request import CreateRequest
from submission.services import Services
from tasks.streams import StreamReader, TokenEvent

CHAT_WAIT_S = STREAM_WAIT_S
FIRST_PAUSE_S = 0.01
MAX_PAUSE_S = 0.25


async def complete(
    services: Services,
    committer: GroupCommitter,
    tenant_id: uuid.UUID,
    body: ChatCompletionBody,
    *,
    disconnected: Callable[[], Awaitable[bool]],
    waits: WaitSlots,
) -> ChatCompletion:
    """Submit the chat and answer its completion once a worker has written it. The wait is a
    long poll: over the tenant's cap the answer is a 429 before anything is submitted."""
    with waits.hold(tenant_id):
        row = await _submit(services, committer, tenant_id, body)
        row = await _wait(services, tenant_id, row.id, disconnected)
    if row.status is RequestStatus.SUCCEEDED:
        return ChatCompletion.of(row)
    if not row.status.terminal:
        raise ApiError(504, _still_open(row), code="timeout")
    raise ApiError(500, _failed(row), code="engine_error")


async def stream(
    services: Services,
    committer: GroupCommitter,
    reader: StreamReader,
    tenant_id: uuid.UUID,
    body: ChatCompletionBody,
) -> AsyncIterator[str]:
    """Submit the chat (refusals raise here, before anything is streamed) and return the SSE
    body that follows it."""
    row = await _submit(services, committer, tenant_id, body)
    usage = bool(body.stream_options and body.stream_options.include_usage)
    return sse(services, reader, row, ChatChunks(row, include_usage=usage), wait_s=CHAT_WAIT_S)


class ChatChunks:
    """A completion as OpenAI streams it: a role chunk, content chunks, a chunk with the finish
    reason, the usage chunk if asked, then ``[DONE]``. Text the token stream did not carry
    (an engine that does not stream, a fallback model) is sent from the record before the
    finish; a failure after the stream began is an error event."""

    def __init__(self, row: Request, *, include_usage: bool) -> None:
        self._id, self._model = completion_id(row), row.model
        self._created = unix(row.created_at) or 0
        self._include_usage = include_usage
        self._sent = ""

    def opening(self) -> list[str]:
        return [self._chunk(ChunkDelta(role="assistant", content=""))]

    def update(self, update: TokenEvent | Request) -> list[str]:
        if isinstance(update, Request):
            return self._end(update)
        if update.index != 0:  # n is 1
            return []
        self._sent += update.delta
        return [self._chunk(ChunkDelta(content=update.delta))]

    def error(self, message: str, *, code: str = "stream_error") -> list[str]:
        detail = {"message": message, "type": "server_error", "param": None, "code": code}
        return [event(None, json.dumps({"error": detail}))]

    def _end(self, row: Request) -> list[str]:
        if not row.status.terminal:
            return self.error(_still_open(row), code="timeout")
        if row.status is not RequestStatus.SUCCEEDED:
            return self.error(_failed(row), code="engine_error")
        self._model = row.model  # the model that answered (after a fallback, another)
        frames, content = [], content_of(row)
        if content.startswith(self._sent) and len(content) > len(self._sent):
            frames.append(self._chunk(ChunkDelta(content=content[len(self._sent) :])))
        frames.append(self._chunk(ChunkDelta(), finish=finish_reason_of(row)))
        if self._include_usage:
            frames.append(self._frame([], usage=CompletionUsage.of(row)))
        return [*frames, event(None, "[DONE]")]

    def _chunk(self, delta: ChunkDelta, *, finish: str | None = None) -> str:
        return self._frame([ChunkChoice(delta=delta, finish_reason=finish)])

    def _frame(self, choices: list[ChunkChoice], *, usage: CompletionUsage | None = None) -> str:
        chunk = ChatCompletionChunk(
            id=self._id, created=self._created, model=self._model, choices=choices, usage=usage
        )
        return event(None, chunk.model_dump_json())


async def _submit(
    services: Services, committer: GroupCommitter, tenant_id: uuid.UUID, body: ChatCompletionBody
) -> Request:
    check_model(services, body.model, embedding=False)
    return await submit_one(services, committer, tenant_id, body.to_native(Priority.INTERACTIVE))


def check_model(services: Services, model: str, *, embedding: bool) -> None:
    """A configured model of the right kind: an embedding model only embeds, and only it does."""
    spec = services.config.models.get(model)
    if spec is None:
        known = ", ".join(sorted(services.config.models))
        raise ApiError(
            404,
            f"model {model!r} is not configured; configured: {known}",
            code="model_not_found",
            param="model",
        )
    problem = model_kind_problem(spec, model, embedding=embedding)
    if problem is not None:
        raise ApiError(400, problem, code="model_not_supported", param="model")


async def submit_one(
    services: Services, committer: GroupCommitter, tenant_id: uuid.UUID, native: CreateRequest
) -> Request:
    """Validate and group-commit one native request (refusals raise here); its row."""
    [row] = await submit_all(services, committer, tenant_id, [native])
    return row


async def submit_all(
    services: Services,
    committer: GroupCommitter,
    tenant_id: uuid.UUID,
    natives: list[CreateRequest],
) -> list[Request]:
    """Validate every request first (a refusal raises before any is written), then commit
    them together; their rows, in order."""

    def prepare_each() -> list[Prepared]:
        return [prepare(services, tenant_id, native) for native in natives]

    prepared = await run_in_threadpool(prepare_each)
    done = await asyncio.gather(*(asyncio.wrap_future(committer.submit(p)) for p in prepared))
    return [row for row, _created in done]


async def wait_all(
    services: Services,
    tenant_id: uuid.UUID,
    rows: list[Request],
    disconnected: Callable[[], Awaitable[bool]],
) -> list[Request]:
    """Wait for each request within one bound; the first not succeeded raises (504 or 500)."""
    deadline = time.monotonic() + CHAT_WAIT_S
    done = []
    for row in rows:
        row = await _wait(services, tenant_id, row.id, disconnected, deadline=deadline)
        if not row.status.terminal:
            raise ApiError(504, _still_open(row), code="timeout")
        if row.status is not RequestStatus.SUCCEEDED:
            raise ApiError(500, _failed(row), code="engine_error")
        done.append(row)
    return done


def _still_open(row: Request) -> str:
    return (
        f"no result within {CHAT_WAIT_S:.0f}s; request {row.id} is still {row.status.value} "
        f"(GET /v1/requests/{row.id} reads it later)"
    )


def _failed(row: Request) -> str:
    return f"request {row.id} {row.status.value}: {row.error}"


async def _wait(
    services: Services,
    tenant_id: uuid.UUID,
    request_id: uuid.UUID,
    disconnected: Callable[[], Awaitable[bool]],
    *,
    deadline: float | None = None,
) -> Request:
    deadline = time.monotonic() + CHAT_WAIT_S if deadline is None else deadline
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
