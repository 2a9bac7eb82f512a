"""Native API handlers: each parses, calls one function, and shapes the answer."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from api.auth import Caller, services_of
from api.schemas import ModelList, ModelPublic, RequestPublic
from api.streaming import SSE_HEADERS, RequestFrames, sse
from storage.requests import get_for_tenant
from storage.tables import Request as RequestRow
from submission.prepare import prepare
from submission.request import CreateRequest
from submission.services import Services
from tasks.queues import model_queue

router = APIRouter()


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/v1/models")
def list_models(request: Request, _: Caller) -> ModelList:
    config = services_of(request).config
    return ModelList(
        data=[
            ModelPublic(
                id=name,
                engine=spec.engine,
                max_model_len=spec.max_model_len,
                queue=model_queue(name),
            )
            for name, spec in config.models.items()
        ]
    )


@router.post("/v1/requests", status_code=status.HTTP_202_ACCEPTED)
def create_request(request: Request, tenant: Caller, body: CreateRequest) -> RequestPublic:
    prepared = prepare(services_of(request), tenant.id, body)
    row, _created = request.app.state.committer.submit(prepared).result()
    return RequestPublic.of(row)


@router.get("/v1/requests/{request_id}")
async def get_request(
    request: Request,
    tenant: Caller,
    request_id: uuid.UUID,
    wait: Annotated[float, Query(ge=0, description="Seconds to wait for a result")] = 0,
) -> RequestPublic:
    """A long poll (``wait``) checks with backoff on the event loop, holding no thread; a
    tenant holds at most ``max_waits_per_tenant`` of them (one more is a 429)."""
    services = services_of(request)
    deadline = time.monotonic() + min(wait, services.settings.max_wait_s)
    row = await _found(services, tenant.id, request_id)
    if row.status.terminal or time.monotonic() >= deadline:
        return RequestPublic.of(row)
    pause = 0.02
    with request.app.state.waits.hold(tenant.id):
        while not row.status.terminal and time.monotonic() < deadline:
            await asyncio.sleep(min(pause, max(deadline - time.monotonic(), 0)))
            pause = min(pause * 2, 0.5)
            row = await _found(services, tenant.id, request_id)
    return RequestPublic.of(row)


@router.get(
    "/v1/requests/{request_id}/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
)
async def stream_request(request: Request, tenant: Caller, request_id: uuid.UUID) -> Response:
    """Server-Sent Events: ``token`` events as the request generates (if it was submitted with
    ``stream: true``), then a ``result`` event with the record; closing early cancels it."""
    services = services_of(request)
    row = await run_in_threadpool(_load, services, tenant.id, request_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no request {request_id}")
    body = sse(services, request.app.state.streams, row, RequestFrames())
    return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)


async def _found(services: Services, tenant_id: uuid.UUID, request_id: uuid.UUID) -> RequestRow:
    row = await run_in_threadpool(_load, services, tenant_id, request_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no request {request_id}")
    return row


def _load(services: Services, tenant_id: uuid.UUID, request_id: uuid.UUID) -> RequestRow | None:
    with services.sessions() as session:
        return get_for_tenant(session, tenant_id, request_id)
