"""Retention: old uploads and request payloads go, the ledger's figures stay.

A finished request older than the cutoff keeps its row (the ledger's rows point at it, and
reports read its status and times) but loses its payload: ``input`` becomes ``{}`` and
``output`` null. Uploaded files older than the cutoff are deleted; a batch created from one
does not need it (it took its own copy of the lines). Work is done in bounded transactions,
so a prune of millions of rows neither holds long locks nor one huge transaction.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Text, cast, delete, null, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.enums import OPEN_STATUSES
from storage.openai_files import StoredFile
from storage.tables import Job, Request

PRUNE_BATCH = 5000
EMPTY_INPUT = "{}"  # how the JSON column stores an emptied input
SIZE_KEYS = ("output_bytes", "errors_bytes")  # generated files' sizes, kept in jobs.shared


@dataclass(frozen=True, slots=True)
class Pruned:
    files: int
    file_bytes: int
    requests: int


def prune(sessions: sessionmaker[Session], cutoff: datetime, *, batch: int = PRUNE_BATCH) -> Pruned:
    """Delete files created before ``cutoff`` and empty the payloads of requests that
    finished before it. Running it again finds nothing more to do."""
    files, file_bytes = _prune_files(sessions, cutoff, batch)
    requests = 0
    while True:
        with sessions.begin() as session:
            ids = list(
                session.scalars(
                    select(Request.id)
                    .where(
                        Request.finished_at < cutoff,
                        Request.status.not_in(OPEN_STATUSES),
                        (cast(Request.input, Text) != EMPTY_INPUT) | Request.output.is_not(None),
                    )
                    .limit(batch)
                )
            )
            if not ids:
                return Pruned(files, file_bytes, requests)
            _forget_file_sizes(session, ids)
            session.execute(
                update(Request)
                .where(Request.id.in_(ids))
                .values(input={}, output=null())  # SQL NULL, not JSON null
                .execution_options(synchronize_session=False)
            )
            requests += len(ids)


def _forget_file_sizes(session: Session, request_ids: list[uuid.UUID]) -> None:
    """A batch's output and error files are kept as sizes only (``api.openai_files``);
    emptying its requests changes them, so they are counted again when next asked for."""
    job_ids = select(Request.job_id).where(Request.id.in_(request_ids)).distinct()
    for job in session.scalars(select(Job).where(Job.id.in_(job_ids))):
        shared = job.shared or {}
        if any(key in shared for key in SIZE_KEYS):
            job.shared = {k: v for k, v in shared.items() if k not in SIZE_KEYS}


def _prune_files(sessions: sessionmaker[Session], cutoff: datetime, batch: int) -> tuple[int, int]:
    count = size = 0
    while True:
        with sessions.begin() as session:
            found = session.execute(
                select(StoredFile.id, StoredFile.size)
                .where(StoredFile.created_at < cutoff)
                .limit(batch)
            ).all()
            if not found:
                return count, size
            session.execute(delete(StoredFile).where(StoredFile.id.in_([f.id for f in found])))
            count += len(found)
            size += sum(f.size for f in found)
