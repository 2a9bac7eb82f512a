"""Bulk job handlers: upload (JSONL or JSON), progress, cancel, results and errors."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from api.auth import Caller, services_of
from api.jobs import JobBody, JobSpec, as_jsonl, create_job
from api.jsonl import TooManyLines, read_counted
from api.schemas import JobList, JobPublic, result_line
from core.enums import JobStatus
from core.settings import Settings
from storage import jobs
from storage.events import close_finished_jobs
from storage.tables import Job, utcnow
from submission.prepare import BadRequest
from submission.services import Services
from tasks.webhooks import publish_deliveries

router = APIRouter()
NDJSON = "application/x-ndjson"


@router.post("/v1/jobs", status_code=status.HTTP_202_ACCEPTED)
async def post_job(request: Request, tenant: Caller) -> JobPublic:
    """``multipart/form-data`` with ``file`` (JSONL) and ``job`` (the spec as JSON), or a
    JSON body with the spec and ``items``."""
    services = services_of(request)
    spec, data = await _read_upload(request, services)
    job, _errors = await run_in_threadpool(create_job, services, tenant.id, spec, data)
    if job.status is JobStatus.VALIDATING:
        await run_in_threadpool(request.app.state.admitter.admit_first, job.id, data)
    return await run_in_threadpool(_public, services, tenant.id, job.id)


@router.get("/v1/jobs")
def get_jobs(request: Request, tenant: Caller, limit: int = 50) -> JobList:
    services = services_of(request)
    with services.sessions() as session:
        found = jobs.list_jobs(session, tenant.id, limit=min(max(limit, 1), 500))
        return JobList(data=[JobPublic.of(job, jobs.progress(session, job)) for job in found])


@router.get("/v1/jobs/{job_id}")
def get_job(request: Request, tenant: Caller, job_id: uuid.UUID) -> JobPublic:
    return _public(services_of(request), tenant.id, job_id)


@router.post("/v1/jobs/{job_id}/cancel")
def cancel_job(request: Request, tenant: Caller, job_id: uuid.UUID) -> JobPublic:
    services = services_of(request)
    with services.sessions.begin() as session:
        now = utcnow()
        jobs.cancel(session, _owned(session, tenant.id, job_id), now)
        deliveries = close_finished_jobs(session, [job_id], now)
    publish_deliveries(services.celery, deliveries)
    return _public(services, tenant.id, job_id)


@router.get("/v1/jobs/{job_id}/results")
def get_results(request: Request, tenant: Caller, job_id: uuid.UUID) -> StreamingResponse:
    services = services_of(request)
    with services.sessions() as session:
        _owned(session, tenant.id, job_id)

    def lines() -> Iterator[bytes]:
        with services.sessions() as session:
            for row in jobs.results(session, job_id):
                yield json.dumps(result_line(row)).encode() + b"\n"

    return StreamingResponse(lines(), media_type=NDJSON)


@router.get("/v1/jobs/{job_id}/errors")
def get_errors(request: Request, tenant: Caller, job_id: uuid.UUID) -> StreamingResponse:
    services = services_of(request)
    with services.sessions() as session:
        _owned(session, tenant.id, job_id)
        rows = jobs.errors(session, job_id)
    body = b"".join(
        json.dumps({"line": e.line, "id": e.item_id, "error": e.message}).encode() + b"\n"
        for e in rows
    )
    return StreamingResponse(iter([body]), media_type=NDJSON)


def _owned(session: Any, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    job = jobs.get_job(session, tenant_id, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
    return job


def _public(services: Services, tenant_id: uuid.UUID, job_id: uuid.UUID) -> JobPublic:
    with services.sessions.begin() as session:
        job = _owned(session, tenant_id, job_id)
        now = utcnow()
        deliveries = []
        if jobs.expire_overdue(session, job, now):
            deliveries = close_finished_jobs(session, [job_id], now)
        public = JobPublic.of(job, jobs.progress(session, job))
    publish_deliveries(services.celery, deliveries)
    return public


async def _read_upload(request: Request, services: Services) -> tuple[JobSpec, bytes]:
    """The spec and the JSONL. The file part waits on disk (Starlette spools it) until its
    lines are counted, so an upload over the line limit is never read whole; the JSON form
    has its own, smaller cap and is parsed off the event loop."""
    settings = services.settings
    try:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_part_size=settings.max_upload_bytes)
            upload, spec_text = form.get("file"), form.get("job")
            if not isinstance(upload, UploadFile) or not isinstance(spec_text, str):
                raise BadRequest("multipart upload needs a 'file' part (JSONL) and a 'job' field")
            spec = JobSpec.model_validate_json(spec_text)
            limit = settings.max_job_lines
            return spec, await run_in_threadpool(read_counted, upload.file, limit=limit)
        body = await run_in_threadpool(_parse_body, await _json_body(request, settings), settings)
    except ValidationError as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            exc.errors(include_url=False, include_input=False, include_context=False),
        ) from exc
    # Unset stays unset: an expand job with no temperature gets the kind's sampling default.
    spec = JobSpec.model_validate(body.model_dump(exclude={"items"}, exclude_unset=True))
    return spec, await run_in_threadpool(as_jsonl, body.items)


async def _json_body(request: Request, settings: Settings) -> bytes:
    limit = settings.max_job_json_bytes
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise HTTPException(
                status.HTTP_413_CONTENT_TOO_LARGE,
                f"a JSON job body is over the limit of {limit} bytes; "
                "upload larger jobs as a multipart JSONL file",
            )
        parts.append(part)
    return b"".join(parts)


def _parse_body(raw: bytes, settings: Settings) -> JobBody:
    body = JobBody.model_validate_json(raw)
    if len(body.items) > settings.max_job_lines:
        raise TooManyLines(settings.max_job_lines)
    return body
