"""The OpenAI Batch API over native jobs: files in, a job per batch, files out on demand.

A batch's status is read from its job's progress each time it is read: past the completion
window, what has not started expires first (``storage.jobs.expire_overdue``). A small file is
validated before the batch is answered; a large one is answered ``validating`` and admitted
in the background (``api.admission``), ``in_progress`` from its first admitted line. Output
files are written on demand, so ``completed`` follows ``in_progress`` without a ``finalizing`` wait.
Output and error files get ids derived from their batch (``file-<hex>-output``,
``file-<hex>-errors``) and exist once the batch has ended; their sizes are counted once and
kept with the batch's job. Uploaded files are counted line by line before they are stored,
streamed into the database, and read back a slice at a time.
"""

from __future__ import annotations

import io
import json
import re
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any, BinaryIO

from sqlalchemy.orm import Session

from api.jobs import LineError
from api.jsonl import count_lines, file_chunks
from api.openai_errors import ApiError
from api.openai_lines import CHAT_URL, OPENAI, error_lines, output_line, prepare_lines
from api.openai_schemas import (
    BatchCreate,
    BatchErrorItem,
    BatchErrors,
    BatchList,
    BatchObject,
    BatchStatus,
    FileDeleted,
    FileList,
    FileObject,
    RequestCounts,
    unix,
)
from api.service import Services, submit_job
from inferq.enums import JobStatus, RequestStatus, TaskKind
from storage import jobs
from storage import openai_files as store
from storage.models import Job, JobError, utcnow

WINDOW = re.compile(r"^([1-9][0-9]{0,5})([smh])$")
WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600}
MAX_WINDOW = timedelta(days=7)
MAX_LISTED_ERRORS = 1000
DOWNLOAD_CHUNK_BYTES = 4 << 20
GENERATED = re.compile(r"^file-([0-9a-f]{32})-(output|errors)$")
STATUSES: dict[JobStatus, BatchStatus] = {
    JobStatus.VALIDATING: "in_progress",  # lines admitted so far are running
    JobStatus.IN_PROGRESS: "in_progress",
    JobStatus.CANCELLING: "cancelling",
    JobStatus.CANCELLED: "cancelled",
    JobStatus.COMPLETED: "completed",
    JobStatus.EXPIRED: "expired",
    JobStatus.FAILED: "failed",
}
ENDED = ("completed", "expired", "cancelled")
ENDED_WITHOUT_OUTPUT = (RequestStatus.FAILED, RequestStatus.EXPIRED, RequestStatus.CANCELLED)
STAMPS = {
    "in_progress": ("in_progress_at",),
    "completed": ("finalizing_at", "completed_at"),
    "expired": ("expired_at",),
    "cancelling": ("cancelling_at",),
    "cancelled": ("cancelling_at", "cancelled_at"),
}


def parse_window(text: str) -> timedelta:
    """``24h`` is the only window OpenAI documents; inferq also takes ``<n>s``, ``<n>m`` and
    ``<n>h`` up to seven days, so short deadlines can be used (and tested)."""
    match = WINDOW.match(text)
    window = timedelta(seconds=int(match[1]) * WINDOW_UNITS[match[2]]) if match else None
    if window is None or window > MAX_WINDOW:
        raise ApiError(
            400,
            f"completion_window {text!r} is not supported; use '24h' (or <n>s, <n>m, <n>h "
            f"up to {MAX_WINDOW.days} days)",
            param="completion_window",
        )
    return window


# Files.


def upload_file(
    services: Services, tenant_id: uuid.UUID, *, filename: str, purpose: str, upload: BinaryIO
) -> FileObject:
    """Store a batch input file. Its lines are counted from the spooled upload before it is
    read whole, so a file a batch could never run is refused at once, and so are bytes over
    the tenant's quota (another upload of the same tenant waits for this one's commit)."""
    settings = services.settings
    if purpose != "batch":
        raise ApiError(400, f"purpose {purpose!r} is not supported; use 'batch'", param="purpose")
    size = upload.seek(0, io.SEEK_END)
    if size > settings.max_upload_bytes:
        limit = settings.max_upload_bytes
        raise ApiError(413, f"the file is {size} bytes; the limit is {limit}", param="file")
    count_lines(file_chunks(upload), limit=settings.max_job_lines)
    row = store.StoredFile(
        id=store.new_file_id(),
        tenant_id=tenant_id,
        filename=filename.replace("\x00", "")[:255] or "upload.jsonl",
        purpose=purpose,
        size=size,
        created_at=utcnow(),
    )
    with services.sessions.begin() as session:
        used = store.stored_bytes(session, tenant_id, lock=True)
        quota = settings.tenant_file_quota_bytes
        if quota and used + size > quota:
            raise ApiError(
                400,
                f"your files hold {used} bytes and this one {size}; the quota is "
                f"{quota} bytes a tenant: delete files you no longer need",
                code="quota_exceeded",
                param="file",
            )
        store.insert_streamed(session, row, file_chunks(upload))
    return _file_public(row)


def delete_file(services: Services, tenant_id: uuid.UUID, file_id: str) -> FileDeleted:
    """Delete an uploaded file. A batch created from it keeps running: it took its own copy
    of the lines when it was created. Output and error files are not stored, so they cannot
    be deleted alone; ``inferq prune`` removes old request payloads."""
    with services.sessions.begin() as session:
        if _generated(session, tenant_id, file_id) is not None:
            raise ApiError(
                400,
                f"{file_id} is written from its batch's requests and is not stored; "
                "it cannot be deleted alone",
                param="file_id",
            )
        if not store.delete_file(session, tenant_id, file_id):
            raise ApiError(404, f"no file {file_id!r}", param="file_id")
    return FileDeleted(id=file_id)


def get_file(services: Services, tenant_id: uuid.UUID, file_id: str) -> FileObject:
    with services.sessions.begin() as session:
        generated = _generated(session, tenant_id, file_id)
        if generated is None:
            return _file_public(_owned_file(session, tenant_id, file_id))
        batch, job, kind = generated
        size = _generated_size(session, job, kind)
        ended = batch.completed_at or batch.expired_at or batch.cancelled_at or utcnow()
        return FileObject(
            id=file_id,
            bytes=size,
            created_at=unix(ended) or 0,
            filename=f"{batch.id}_{kind}.jsonl",
            purpose="batch_output",
        )


def _generated_size(session: Session, job: Job, kind: str) -> int:
    """An output or error file's bytes, written out (and counted) once, then kept with its
    job: an ended batch's files do not change until ``inferq prune`` empties them, which
    forgets the sizes."""
    key = f"{kind}_bytes"
    shared = dict(job.shared or {})
    if key not in shared:
        shared[key] = sum(len(chunk) for chunk in _file_lines(session, job, kind))
        job.shared = shared
    return int(shared[key])


def list_files(
    services: Services, tenant_id: uuid.UUID, *, purpose: str | None, limit: int
) -> FileList:
    """Uploaded files, newest first (generated files are reached through their batch)."""
    with services.sessions() as session:
        rows = store.list_files(session, tenant_id, purpose=purpose, limit=limit)
        data = [_file_public(row) for row in rows]
    return FileList(data=data, first_id=_first(data), last_id=_last(data))


def file_content(services: Services, tenant_id: uuid.UUID, file_id: str) -> Iterator[bytes]:
    """The file's bytes; a generated file is written as it is read, in input order."""
    with services.sessions.begin() as session:
        generated = _generated(session, tenant_id, file_id)
        if generated is None:
            size = _owned_file(session, tenant_id, file_id).size
            return _stored_chunks(services, file_id, size)
        _batch, job, kind = generated

    def chunks() -> Iterator[bytes]:
        with services.sessions() as session:
            yield from _file_lines(session, job, kind)

    return chunks()


def _stored_chunks(services: Services, file_id: str, size: int) -> Iterator[bytes]:
    """An uploaded file a slice at a time, so a download holds one slice, not the file."""
    with services.sessions() as session:
        yield from store.content_slices(session, file_id, size, DOWNLOAD_CHUNK_BYTES)


def _owned_file(session: Session, tenant_id: uuid.UUID, file_id: str) -> store.StoredFile:
    row = store.get_file(session, tenant_id, file_id)
    if row is None:
        raise ApiError(404, f"no file {file_id!r}", param="file_id")
    return row


def _generated(
    session: Session, tenant_id: uuid.UUID, file_id: str
) -> tuple[store.Batch, Job, str] | None:
    """A batch's output or error file, if ``file_id`` names one that exists by now."""
    match = GENERATED.match(file_id)
    if match is None:
        return None
    batch = store.get_batch(session, tenant_id, f"batch_{match[1]}")
    public = _public(session, batch, utcnow()) if batch is not None else None
    if public is None or file_id not in (public.output_file_id, public.error_file_id):
        raise ApiError(404, f"no file {file_id!r}", param="file_id")
    assert batch is not None and batch.job_id is not None
    job = session.get(Job, batch.job_id)
    assert job is not None
    return batch, job, match[2]


def _file_lines(session: Session, job: Job, kind: str) -> Iterator[bytes]:
    if kind == "output":
        lines: Iterator[dict[str, Any]] = (
            output_line(row)
            for row in jobs.results(session, job.id)
            if row.status is RequestStatus.SUCCEEDED
        )
    else:
        lines = error_lines(job.id, jobs.errors(session, job.id), jobs.results(session, job.id))
    for line in lines:
        yield json.dumps(line, ensure_ascii=False).encode() + b"\n"


def _file_public(row: store.StoredFile) -> FileObject:
    return FileObject(
        id=row.id,
        bytes=row.size,
        created_at=unix(row.created_at) or 0,
        filename=row.filename,
        purpose=row.purpose,
    )


# Batches.


def create_batch(services: Services, tenant_id: uuid.UUID, body: BatchCreate) -> BatchObject:
    """Validate every line, then write the job, its requests, its refused lines and the batch
    in one commit. A file with no good line makes a ``failed`` batch and runs nothing."""
    if body.endpoint != CHAT_URL:
        raise ApiError(400, f"endpoint {body.endpoint!r} is not supported; use {CHAT_URL}")
    window = parse_window(body.completion_window)
    settings = services.settings
    with services.sessions() as session:
        upload = store.get_file(session, tenant_id, body.input_file_id)
        if upload is None or upload.purpose != "batch":
            raise ApiError(400, f"no batch file {body.input_file_id!r}", param="input_file_id")
        slices = store.content_slices(session, upload.id, upload.size, DOWNLOAD_CHUNK_BYTES)
        lines = count_lines(slices, limit=settings.max_job_lines)  # read a slice at a time
        data = upload.content if lines <= settings.inline_job_lines else None
    now = utcnow()
    if data is None:
        return _create_validating(services, tenant_id, body, now=now)
    prepared, errors = prepare_lines(services, tenant_id, data)
    batch = store.Batch(
        id=store.new_batch_id(),
        tenant_id=tenant_id,
        input_file_id=body.input_file_id,
        endpoint=body.endpoint,
        completion_window=body.completion_window,
        meta=body.metadata,
        created_at=now,
        expires_at=now + window,
    )
    if not prepared:
        batch.status, batch.failed_at, batch.errors = "failed", now, refusals(errors)
        with services.sessions.begin() as session:
            session.add(batch)
        return get_batch(services, tenant_id, batch.id)
    if services.limits is not None:  # 429, like any other way in
        services.limits.admit(prepared)
    models = {item.model for item in prepared}
    job = Job(
        id=uuid.uuid4(),
        tenant_id=tenant_id,
        task=TaskKind.CHAT,
        model=models.pop() if len(models) == 1 else None,
        shared={"openai_batch": batch.id},
        total=len(prepared),
        invalid=len(errors),
        created_at=now,
        deadline_at=batch.expires_at,
    )
    batch.job_id, batch.in_progress_at = job.id, now
    refused = [
        JobError(job_id=job.id, line=e.line, item_id=e.item_id, message=e.message) for e in errors
    ]
    submit_job(services, prepared, job=job, extra=[*refused, batch], deadline_at=batch.expires_at)
    return get_batch(services, tenant_id, batch.id)


def _create_validating(
    services: Services,
    tenant_id: uuid.UUID,
    body: BatchCreate,
    *,
    now: datetime,
) -> BatchObject:
    """A large file: copy it (inside the database) to the job's source and answer
    ``validating``; ``api.admission`` checks and runs it."""
    expires_at = now + parse_window(body.completion_window)
    job = Job(
        id=uuid.uuid4(),
        tenant_id=tenant_id,
        task=TaskKind.CHAT,
        status=JobStatus.VALIDATING,
        created_at=now,
        deadline_at=expires_at,
    )
    batch = store.Batch(
        id=store.new_batch_id(),
        tenant_id=tenant_id,
        job_id=job.id,
        input_file_id=body.input_file_id,
        endpoint=body.endpoint,
        completion_window=body.completion_window,
        meta=body.metadata,
        created_at=now,
        expires_at=expires_at,
    )
    job.shared = {"openai_batch": batch.id}
    with services.sessions.begin() as session:
        session.add(job)
        session.flush()
        if not store.copy_to_source(session, body.input_file_id, job.id, format=OPENAI):
            raise ApiError(400, f"no batch file {body.input_file_id!r}", param="input_file_id")
        session.add(batch)
    return get_batch(services, tenant_id, batch.id)


def get_batch(services: Services, tenant_id: uuid.UUID, batch_id: str) -> BatchObject:
    with services.sessions.begin() as session:
        return _public(session, _owned_batch(session, tenant_id, batch_id), utcnow())


def list_batches(
    services: Services, tenant_id: uuid.UUID, *, after: str | None, limit: int
) -> BatchList:
    with services.sessions.begin() as session:
        rows = store.list_batches(session, tenant_id, after=after, limit=limit + 1)
        now = utcnow()
        data = [_public(session, row, now) for row in rows[:limit]]
    return BatchList(
        data=data, first_id=_first(data), last_id=_last(data), has_more=len(rows) > limit
    )


def cancel_batch(services: Services, tenant_id: uuid.UUID, batch_id: str) -> BatchObject:
    """Lines not yet started are cancelled; running ones finish (``cancelling`` until then)."""
    with services.sessions.begin() as session:
        batch = _owned_batch(session, tenant_id, batch_id)
        now = utcnow()
        current = _public(session, batch, now)
        if current.status in ("completed", "failed", "expired"):
            raise ApiError(400, f"batch {batch_id} is {current.status}; it cannot be cancelled")
        if current.status in ("validating", "in_progress"):
            job = session.get(Job, batch.job_id)
            assert job is not None
            jobs.cancel(session, job, now)
        return _public(session, batch, now)


def _owned_batch(session: Session, tenant_id: uuid.UUID, batch_id: str) -> store.Batch:
    batch = store.get_batch(session, tenant_id, batch_id)
    if batch is None:
        raise ApiError(404, f"no batch {batch_id!r}", param="batch_id")
    return batch


def _public(session: Session, batch: store.Batch, now: datetime) -> BatchObject:
    """The batch as the API shows it, recording when each status was first seen."""
    if batch.job_id is None or batch.status == "failed":
        return _failed_public(batch)
    job = session.get(Job, batch.job_id)
    assert job is not None
    jobs.expire_overdue(session, job, now)
    progress = jobs.progress(session, job)
    status = STATUSES[progress.status]
    if progress.status is JobStatus.VALIDATING and not job.total:
        status = "validating"  # no line admitted yet
    for stamp in STAMPS.get(status, ()):
        if getattr(batch, stamp) is None:
            setattr(batch, stamp, now)
    ok = progress.counts.get(RequestStatus.SUCCEEDED, 0)
    total = job.total + job.invalid
    failed = job.invalid + sum(progress.counts.get(s, 0) for s in ENDED_WITHOUT_OUTPUT)
    ended = status in ENDED
    hex_id = batch.id.removeprefix("batch_")
    return BatchObject(
        **_common(batch),
        model=job.model,
        status=status,
        output_file_id=f"file-{hex_id}-output" if ended and ok else None,
        error_file_id=f"file-{hex_id}-errors" if ended and failed else None,
        request_counts=RequestCounts(total=total, completed=ok, failed=failed),
    )


def _failed_public(batch: store.Batch) -> BatchObject:
    refusals = batch.errors or {}
    lines = int(refusals.get("lines", 0))
    items = [BatchErrorItem.model_validate(item) for item in refusals.get("data", [])]
    return BatchObject(
        **_common(batch),
        status="failed",
        errors=BatchErrors(data=items),
        request_counts=RequestCounts(total=lines, completed=0, failed=lines),
    )


def _common(batch: store.Batch) -> dict[str, Any]:
    return {
        "id": batch.id,
        "endpoint": batch.endpoint,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "metadata": batch.meta,
        "created_at": unix(batch.created_at) or 0,
        **{
            stamp: unix(getattr(batch, stamp))
            for stamp in (
                "in_progress_at",
                "expires_at",
                "finalizing_at",
                "completed_at",
                "failed_at",
                "expired_at",
                "cancelling_at",
                "cancelled_at",
            )
        },
    }


def refusals(errors: list[LineError]) -> dict[str, Any]:
    """Why a batch failed outright, line by line (the first ``MAX_LISTED_ERRORS`` lines)."""
    data: list[dict[str, Any]]
    if not errors:
        data = [{"code": "empty_file", "message": "the input file has no requests"}]
    else:
        data = [
            {"code": "invalid_request", "line": e.line, "message": e.message}
            for e in errors[:MAX_LISTED_ERRORS]
        ]
    return {"lines": len(errors), "data": data}


def _first(data: list[Any]) -> str | None:
    return data[0].id if data else None


def _last(data: list[Any]) -> str | None:
    return data[-1].id if data else None
