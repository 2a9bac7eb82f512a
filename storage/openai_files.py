"""Tables of the OpenAI-compatible surface: uploaded files and batches.

A batch is a native job underneath (its requests carry ``item_id = custom_id``); this row
keeps what the Batch API shows and the job does not: the input file, the window, metadata,
the moments the status changed, and the errors of a batch that failed validation outright.
Output and error files are not stored: they are written from the job's rows on demand.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    ColumnElement,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Uuid,
    delete,
    func,
    insert,
    literal,
    select,
)
from sqlalchemy.orm import InstrumentedAttribute, Mapped, Session, mapped_column

from core.enums import JobStatus
from storage.tables import Base, JobSource, Tenant, utcnow
from storage.webhooks import enqueue_delivery, list_endpoints

SLICE_BYTES = 4 << 20  # how much of a stored file is read at a time


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


class StoredFile(Base):
    """An uploaded file, kept whole: batch inputs are read once, at batch creation."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_file_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    size: Mapped[int] = mapped_column("bytes", Integer)
    content: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Batch(Base):
    """An OpenAI batch; its status comes from its job's progress unless it failed outright."""

    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_batch_id)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    # No job when every line failed validation: nothing was queued.
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    input_file_id: Mapped[str] = mapped_column(String(64))
    endpoint: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    status: Mapped[str | None] = mapped_column(String(16))  # set only for "failed"
    errors: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # why it failed, by line
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    in_progress_at: Mapped[datetime | None]
    finalizing_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]
    expired_at: Mapped[datetime | None]
    cancelling_at: Mapped[datetime | None]
    cancelled_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]


def get_file(session: Session, tenant_id: uuid.UUID, file_id: str) -> StoredFile | None:
    """A file by id, only if it belongs to this tenant; another tenant's id reads as absent."""
    return session.scalar(
        select(StoredFile).where(StoredFile.id == file_id, StoredFile.tenant_id == tenant_id)
    )


def stored_bytes(session: Session, tenant_id: uuid.UUID, *, lock: bool = False) -> int:
    """The bytes of the tenant's uploaded files. With ``lock``, the tenant's row is locked
    until the transaction ends, so two uploads at once cannot both fit the last of a quota."""
    if lock:
        session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())
    used = session.scalar(
        select(func.coalesce(func.sum(StoredFile.size), 0)).where(StoredFile.tenant_id == tenant_id)
    )
    return int(used or 0)


def content_slice(
    session: Session,
    content: InstrumentedAttribute[bytes],
    row: ColumnElement[bool],
    offset: int,
    length: int,
) -> bytes:
    """``length`` bytes from ``offset`` of a stored content (a file's, a job source's), empty
    past its end or if the row is gone. Read so, a content of 200 MB never passes whole
    through the driver, which would hold it several times over."""
    piece = session.scalar(select(func.substr(content, offset + 1, length)).where(row))
    return bytes(piece or b"")


_COPY_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def insert_streamed(session: Session, row: StoredFile, chunks: Iterable[bytes]) -> None:
    """Insert ``row`` with the content that ``chunks`` make up. On Postgres the content is
    streamed in with COPY, so it is never whole in memory (a bytea parameter would be, twice:
    ours and the driver's copy); elsewhere (the embedded SQLite) it is joined."""
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        row.content = b"".join(chunks)
        session.add(row)
        return
    fields = [row.id, str(row.tenant_id), row.filename, row.purpose, str(row.size)]
    fields.append(row.created_at.isoformat())
    head = "\t".join(_copy_field(field) for field in fields)
    sql = "COPY files (id, tenant_id, filename, purpose, bytes, created_at, content) FROM STDIN"
    driver = connection.connection.driver_connection
    assert driver is not None
    with driver.cursor() as cursor, cursor.copy(sql) as copy:
        copy.write(head + "\t\\\\x")  # bytea's hex form; COPY wants its backslash doubled
        for chunk in chunks:
            copy.write(chunk.hex())
        copy.write("\n")


def _copy_field(text: str) -> str:
    """A value in COPY's text format (no NUL: the caller removed them)."""
    return "".join(_COPY_ESCAPES.get(char, char) for char in text)


def content_slices(session: Session, file_id: str, size: int, length: int) -> Iterator[bytes]:
    """A file's content in slices of ``length`` bytes; it ends early if the file is deleted."""
    for offset in range(0, size, length):
        piece = content_slice(session, StoredFile.content, StoredFile.id == file_id, offset, length)
        if not piece:
            return
        yield piece


def copy_to_source(session: Session, file_id: str, job_id: uuid.UUID, *, format: str) -> bool:
    """Copy a file's content into a new job source without it passing through Python; False
    if the file is gone."""
    content = select(
        literal(job_id, Uuid), StoredFile.content, literal(format), literal(False), literal(0)
    ).where(StoredFile.id == file_id)
    columns = ["job_id", "content", "format", "strict", "cursor"]
    result = session.execute(insert(JobSource).from_select(columns, content))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def delete_file(session: Session, tenant_id: uuid.UUID, file_id: str) -> bool:
    """Delete the tenant's file; False if it has none by that id."""
    result = session.execute(
        delete(StoredFile).where(StoredFile.id == file_id, StoredFile.tenant_id == tenant_id)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def list_files(
    session: Session, tenant_id: uuid.UUID, *, purpose: str | None, limit: int
) -> list[StoredFile]:
    query = select(StoredFile).where(StoredFile.tenant_id == tenant_id)
    if purpose is not None:
        query = query.where(StoredFile.purpose == purpose)
    query = query.order_by(StoredFile.created_at.desc(), StoredFile.id.desc())
    return list(session.scalars(query.limit(limit)))


def get_batch(session: Session, tenant_id: uuid.UUID, batch_id: str) -> Batch | None:
    return session.scalar(select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id))


def list_batches(
    session: Session, tenant_id: uuid.UUID, *, after: str | None, limit: int
) -> list[Batch]:
    """Newest first; ``after`` is the last id of the previous page (the Batch API's cursor)."""
    query = select(Batch).where(Batch.tenant_id == tenant_id)
    if after is not None:
        cursor = get_batch(session, tenant_id, after)
        if cursor is None:
            return []
        query = query.where(
            (Batch.created_at < cursor.created_at)
            | ((Batch.created_at == cursor.created_at) & (Batch.id < cursor.id))
        )
    query = query.order_by(Batch.created_at.desc(), Batch.id.desc())
    return list(session.scalars(query.limit(limit)))


# The Batch API's webhook events, for every endpoint the tenant has (not disabled).
BATCH_EVENTS = {
    JobStatus.COMPLETED: "batch.completed",
    JobStatus.FAILED: "batch.failed",
    JobStatus.EXPIRED: "batch.expired",
    JobStatus.CANCELLED: "batch.cancelled",
}


def batch_event(
    session: Session, *, tenant_id: uuid.UUID, batch_id: str, status: JobStatus
) -> list[uuid.UUID]:
    """Queue ``batch.<status>`` (its ``data`` is ``{"id": batch_id}``, as OpenAI sends it) to
    each of the tenant's webhook endpoints, in the caller's transaction; the delivery ids, to
    publish after the commit. A status with no event queues nothing."""
    event_type = BATCH_EVENTS.get(status)
    if event_type is None:
        return []
    return [
        enqueue_delivery(
            session,
            tenant_id=tenant_id,
            url=endpoint.url,
            event_type=event_type,
            payload={"id": batch_id},
        )
        for endpoint in list_endpoints(session, tenant_id)
        if endpoint.disabled_at is None
    ]
