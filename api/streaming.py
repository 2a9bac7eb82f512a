"""Following a request as it runs, for the two streaming surfaces (Server-Sent Events):
``GET /v1/requests/{id}/stream`` and ``POST /v1/chat/completions`` with ``stream: true``.

A worker publishes the text it generates on the request's token stream (``tasks.streams``) and,
once the result is committed, a ``done`` event; the stream then ends with the record Postgres
holds. Postgres stays the truth: the row is also read every ``CHECK_S``, so a lost done event,
an engine that does not stream or an unreachable Redis cost latency, not the answer. The wait
is bounded like a chat completion's. A client that leaves before the end cancels its request.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Protocol

import anyio
import redis
from fastapi.concurrency import run_in_threadpool

from api.schemas import RequestPublic
from storage.requests import cancel_request, get_for_tenant
from storage.tables import Request, utcnow
from submission.services import Services
from tasks.streams import START, StreamReader, TokenEvent

log = logging.getLogger(__name__)

STREAM_WAIT_S = 600.0  # how long a stream follows a request (a chat completion waits as long)
CHECK_S = 1.0  # how often the row is read while no done event came
HEARTBEAT_S = 15.0  # a comment line while nothing else is sent, so proxies keep the connection
KEEP_ALIVE = ": keep-alive\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# What following a request yields: new text, None while quiet, and last the request's row
# (ended, or as it stands when the wait ran out).
Update = TokenEvent | Request | None


class Frames(Protocol):
    """How one surface writes a followed request as SSE frames."""

    def opening(self) -> list[str]: ...

    def update(self, update: TokenEvent | Request) -> list[str]: ...

    def error(self, message: str) -> list[str]: ...


class RequestFrames:
    """The native stream: ``token`` events (``{"index", "delta"}``), then one ``result`` event
    with the record ``GET /v1/requests/{id}`` answers (or ``error`` if following failed)."""

    def opening(self) -> list[str]:
        return []

    def update(self, update: TokenEvent | Request) -> list[str]:
        if isinstance(update, TokenEvent):
            token = {"index": update.index, "delta": update.delta}
            return [event("token", json.dumps(token, ensure_ascii=False))]
        return [event("result", RequestPublic.of(update).model_dump_json())]

    def error(self, message: str) -> list[str]:
        return [event("error", json.dumps({"detail": message}))]


def event(name: str | None, data: str) -> str:
    """One SSE frame; ``data`` is one line of JSON."""
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {data}\n\n"


async def sse(
    services: Services,
    reader: StreamReader,
    row: Request,
    frames: Frames,
    *,
    wait_s: float = STREAM_WAIT_S,
) -> AsyncIterator[str]:
    """The body of an SSE answer: the request's frames, a comment while quiet.

    Closing early (the client went away: Starlette cancels the body) cancels the request.
    """
    finished = False
    try:
        for frame in frames.opening():
            yield frame
        last_sent = time.monotonic()
        async for update in follow(services, reader, row, wait_s=wait_s):
            if update is None:
                if time.monotonic() - last_sent >= HEARTBEAT_S:
                    last_sent = time.monotonic()
                    yield KEEP_ALIVE
                continue
            for frame in frames.update(update):
                yield frame
            last_sent = time.monotonic()
        finished = True
    except Exception:
        log.exception("streaming request %s failed", row.id)
        finished = True
        for frame in frames.error("the stream failed; read the request to see its result"):
            yield frame
    finally:
        if not finished:
            with anyio.CancelScope(shield=True):
                await _abandon(services, row.id)


async def follow(
    services: Services, reader: StreamReader, row: Request, *, wait_s: float
) -> AsyncIterator[Update]:
    """New text as it comes, ``None`` after each quiet ``CHECK_S``, then the row (see Update)."""
    deadline = time.monotonic() + wait_s
    cursor, checked = START, time.monotonic()
    while True:
        now = time.monotonic()
        if now - checked >= CHECK_S or now >= deadline:
            row, checked = await _load(services, row), now
        # Ended (the done event was lost, or never sent): take what is already published.
        ending = row.status.terminal or now >= deadline
        block_s = 0.001 if ending else min(CHECK_S, deadline - now)
        events, cursor = await _read(reader, row.id, cursor, block_s=block_s)
        for token in events:
            if token.done:
                yield await _load(services, row)
                return
            if token.delta:
                yield token
        if ending:
            yield row
            return
        if not events:
            yield None


async def _read(
    reader: StreamReader, request_id: uuid.UUID, cursor: str, *, block_s: float
) -> tuple[list[TokenEvent], str]:
    try:
        return await reader.read(str(request_id), cursor, block_s=block_s)
    except (redis.RedisError, OSError) as exc:  # the database still says when it ends
        log.warning("token stream of %s unreadable: %s", request_id, exc)
        await anyio.sleep(block_s)
        return [], cursor


async def _load(services: Services, row: Request) -> Request:
    def load() -> Request:
        with services.sessions() as session:
            found = get_for_tenant(session, row.tenant_id, row.id)
        assert found is not None  # committed before the stream began; rows are not deleted
        return found

    return await run_in_threadpool(load)


async def _abandon(services: Services, request_id: uuid.UUID) -> None:
    def cancel() -> bool:
        with services.sessions.begin() as session:
            return cancel_request(session, request_id, utcnow())

    try:
        if await run_in_threadpool(cancel):
            log.info("request %s cancelled: its client closed the stream", request_id)
    except Exception:  # the client is gone either way; the request runs to its end
        log.exception("cancelling request %s after its client left failed", request_id)
