"""OpenAI-compatible handlers: ``/v1/files``, ``/v1/batches``, ``/v1/chat/completions``,
``/v1/completions`` and ``/v1/embeddings``.

Each parses, calls one function of :mod:`api.openai_files`, :mod:`api.openai_batches`,
:mod:`api.openai_chat`, :mod:`api.openai_completions` or :mod:`api.openai_embeddings`, and
returns its shape; errors come back in the OpenAI shape
(:class:`api.openai_errors.OpenAIRoute`).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile

from api import openai_batches as batches
from api import openai_completions as completions
from api import openai_embeddings as embeddings
from api import openai_files as files
from api.auth import Caller, services_of
from api.openai_chat import complete, stream
from api.openai_errors import ApiError, OpenAIRoute
from api.openai_schemas import (
    ERRORS,
    BatchCreate,
    BatchList,
    BatchObject,
    ChatCompletion,
    ChatCompletionBody,
    ErrorBody,
    FileDeleted,
    FileList,
    FileObject,
)
from api.streaming import SSE_HEADERS

router = APIRouter(route_class=OpenAIRoute, responses=ERRORS)
Limit = Annotated[int, Query(ge=1, le=100)]


@router.post("/v1/files")
async def create_file(request: Request, tenant: Caller) -> FileObject:
    """``multipart/form-data`` with ``file`` and ``purpose`` (``batch``)."""
    services = services_of(request)
    form = await request.form(max_part_size=services.settings.max_upload_bytes)
    upload, purpose = form.get("file"), form.get("purpose")
    if not isinstance(upload, UploadFile):
        raise ApiError(400, "the upload needs a 'file' part", param="file")
    if not isinstance(purpose, str):
        raise ApiError(400, "the upload needs a 'purpose' field", param="purpose")
    return await run_in_threadpool(
        files.upload_file,
        services,
        tenant.id,
        filename=upload.filename or "",
        purpose=purpose,
        upload=upload.file,  # spooled to disk by Starlette; read after its lines are counted
    )


@router.get("/v1/files")
def list_files(
    request: Request, tenant: Caller, purpose: str | None = None, limit: Limit = 100
) -> FileList:
    return files.list_files(services_of(request), tenant.id, purpose=purpose, limit=limit)


@router.get("/v1/files/{file_id}")
def get_file(request: Request, tenant: Caller, file_id: str) -> FileObject:
    return files.get_file(services_of(request), tenant.id, file_id)


@router.delete("/v1/files/{file_id}")
def delete_file(request: Request, tenant: Caller, file_id: str) -> FileDeleted:
    return files.delete_file(services_of(request), tenant.id, file_id)


@router.get("/v1/files/{file_id}/content")
def get_file_content(request: Request, tenant: Caller, file_id: str) -> StreamingResponse:
    chunks = files.file_content(services_of(request), tenant.id, file_id)
    return StreamingResponse(chunks, media_type="application/octet-stream")


@router.post("/v1/batches")
def create_batch(request: Request, tenant: Caller, body: BatchCreate) -> BatchObject:
    batch = batches.create_batch(services_of(request), tenant.id, body)
    if batch.status == "validating":
        request.app.state.admitter.wake()
    return batch


@router.get("/v1/batches")
def list_batches(
    request: Request, tenant: Caller, after: str | None = None, limit: Limit = 20
) -> BatchList:
    return batches.list_batches(services_of(request), tenant.id, after=after, limit=limit)


@router.get("/v1/batches/{batch_id}")
def get_batch(request: Request, tenant: Caller, batch_id: str) -> BatchObject:
    return batches.get_batch(services_of(request), tenant.id, batch_id)


@router.post("/v1/batches/{batch_id}/cancel")
def cancel_batch(request: Request, tenant: Caller, batch_id: str) -> BatchObject:
    return batches.cancel_batch(services_of(request), tenant.id, batch_id)


CHAT_ERRORS: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "The completion; with ``stream: true``, ``chat.completion.chunk`` events "
        "then ``data: [DONE]``.",
    },
    500: {"model": ErrorBody, "description": "The request ran and failed (after retries)."},
    504: {"model": ErrorBody, "description": "No result in time; the request keeps running."},
}


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=CHAT_ERRORS)
async def chat_completions(
    request: Request, tenant: Caller, body: ChatCompletionBody
) -> ChatCompletion | StreamingResponse:
    """Enqueue at interactive priority and wait for the answer, or with ``stream: true``
    follow it as Server-Sent Events (closing the stream cancels the request)."""
    services, committer = services_of(request), request.app.state.committer
    if body.stream:
        reader = request.app.state.streams
        chunks = await stream(services, committer, reader, tenant.id, body)
        return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
    return await complete(
        services,
        committer,
        tenant.id,
        body,
        disconnected=request.is_disconnected,
        waits=request.app.state.waits,
    )


@router.post("/v1/completions", response_model=completions.Completion, responses=CHAT_ERRORS)
async def text_completions(
    request: Request, tenant: Caller, body: completions.CompletionBody
) -> completions.Completion | StreamingResponse:
    """Enqueue each prompt (and choice) at interactive priority and wait for all, or with
    ``stream: true`` (one prompt) follow it as Server-Sent Events."""
    services, committer = services_of(request), request.app.state.committer
    if body.stream:
        reader = request.app.state.streams
        chunks = await completions.stream(services, committer, reader, tenant.id, body)
        return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
    return await completions.complete(
        services,
        committer,
        tenant.id,
        body,
        disconnected=request.is_disconnected,
        waits=request.app.state.waits,
    )


EMBEDDING_ERRORS: dict[int | str, dict[str, Any]] = {
    500: CHAT_ERRORS[500],
    504: CHAT_ERRORS[504],
}


@router.post("/v1/embeddings", responses=EMBEDDING_ERRORS)
async def create_embeddings(
    request: Request, tenant: Caller, body: embeddings.EmbeddingBody
) -> embeddings.EmbeddingList:
    """Enqueue each input at interactive priority on an embedding model and wait for all."""
    return await embeddings.embed(
        services_of(request),
        request.app.state.committer,
        tenant.id,
        body,
        disconnected=request.is_disconnected,
        waits=request.app.state.waits,
    )
