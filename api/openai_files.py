"""The OpenAI Files API: batch input files in, and a batch's output and error files out.

Uploaded files are counted line by line before they are stored, streamed into the database,
and read back a slice at a time. Output and error files get ids derived from their batch
(``file-<hex>-output``, ``file-<hex>-errors``), exist once the batch has ended, and are written
on demand from its requests (``api.openai_lines``); their sizes are counted once and kept with
the batch's job.
"""

from __future__ import annotations

import io
import re
import uuid
from collections.abc import Iterator
from typing import BinaryIO

from sqlalchemy.orm import Session

from api.jsonl import count_lines, file_chunks
from api.openai_batches import batch_public
from api.openai_errors import ApiError
from api.openai_lines import file_lines
from api.openai_schemas import FileDeleted, FileList, FileObject, list_ends, unix
from storage import openai_files as store
from storage.tables import Job, utcnow
from submission.services import Services

GENERATED = re.compile(r"^file-([0-9a-f]{32})-(output|errors)$")


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
        shared[key] = sum(len(chunk) for chunk in file_lines(session, job, kind))
        job.shared = shared
    return int(shared[key])


def list_files(
    services: Services, tenant_id: uuid.UUID, *, purpose: str | None, limit: int
) -> FileList:
    """Uploaded files, newest first (generated files are reached through their batch)."""
    with services.sessions() as session:
        rows = store.list_files(session, tenant_id, purpose=purpose, limit=limit)
        data = [_file_public(row) for row in rows]
    return FileList(data=data, **list_ends(data))


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
            yield from file_lines(session, job, kind)

    return chunks()


def _stored_chunks(services: Services, file_id: str, size: int) -> Iterator[bytes]:
    """An uploaded file a slice at a time, so a download holds one slice, not the file."""
    with services.sessions() as session:
        yield from store.content_slices(session, file_id, size, store.SLICE_BYTES)


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
    public = batch_public(session, batch, utcnow()) if batch is not None else None
    if public is None or file_id not in (public.output_file_id, public.error_file_id):
        raise ApiError(404, f"no file {file_id!r}", param="file_id")
    assert batch is not None and batch.job_id is not None
    job = session.get(Job, batch.job_id)
    assert job is not None
    return batch, job, match[2]


def _file_public(row: store.StoredFile) -> FileObject:
    return FileObject(
        id=row.id,
        bytes=row.size,
        created_at=unix(row.created_at) or 0,
        filename=row.filename,
        purpose=row.purpose,
    )
