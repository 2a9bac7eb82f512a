"""Admitting large uploads in the background: check, insert and publish a chunk at a time.

An upload of more than ``settings.inline_job_lines`` lines is answered at once, its job
``validating``, and its raw lines wait in ``job_sources``. The :class:`Admitter` thread takes a
chunk at a time (a small first one, so the first result comes quickly), checks it with the
same code as an inline upload, and in one transaction inserts its requests and refused lines
and advances the source's cursor; only after the commit does it publish them. A restart
resumes at the cursor, and a crash between commit and publish is the reconciler's to repair.
While a job has ``admission_max_open`` requests waiting it is not admitted further, so a big
job fills its queue gradually and interactive work still gets in.

A strict job is checked whole before anything of it is inserted: one bad line fails it.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api import jobs as native
from api import openai_lines
from api.jobs import LineError, parse_line
from api.openai_batches import refusals
from api.openai_lines import OPENAI
from api.service import Prepared, Services, insert_job_requests, publish_requests
from inferq.enums import JobStatus, RequestStatus
from storage.events import close_finished_jobs
from storage.models import Job, JobError, JobSource, Request, utcnow
from storage.openai_files import Batch
from tasks.webhooks import publish_deliveries

log = logging.getLogger(__name__)

Checked = tuple[list[Prepared], list[LineError]]


def _check_native(
    services: Services, job: Job, source: JobSource, lines: list[tuple[int, Any]], seen: dict
) -> Checked:
    spec = native.spec_of(job, strict=source.strict)
    return native.check_lines(services, job.tenant_id, spec, lines, seen)


def _check_openai(
    services: Services, job: Job, source: JobSource, lines: list[tuple[int, Any]], seen: dict
) -> Checked:
    del source
    return openai_lines.check_lines(services, job.tenant_id, lines, seen)


CHECKERS: dict[str, Callable[..., Checked]] = {
    native.NATIVE: _check_native,
    OPENAI: _check_openai,
}


class _Upload:
    """A source's lines, split once and kept while the job is being admitted."""

    def __init__(self, content: bytes) -> None:
        self.lines = native.numbered_lines(content)
        self.cursor = 0
        self.first_seen: dict[str, int] = {}


class Admitter:
    """The background thread that admits validating jobs, one chunk per job in turn."""

    def __init__(self, services: Services, *, idle_s: float = 1.0) -> None:
        self._services = services
        self._idle_s = idle_s
        self._uploads: dict[uuid.UUID, _Upload] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="inferq-admitter", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)

    def wake(self) -> None:
        """A job was stored: look for work now rather than at the next idle tick."""
        self._wake.set()

    def admit_first(self, job_id: uuid.UUID, content: bytes) -> None:
        """Admit a just-stored job's first chunk on the caller's thread, from the upload in
        hand (not read back), so its first results are on their way before the answer; the
        thread takes the rest."""
        self._uploads.setdefault(job_id, _Upload(content))
        try:
            self.admit_chunk(job_id)
        except Exception:  # the thread retries from the cursor
            log.exception("admitting the first chunk of job %s failed", job_id)
        self.wake()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            progressed = False
            try:
                for job_id in self._pending():
                    progressed |= self.admit_chunk(job_id)
            except Exception:  # the database is down, say: try again on the next tick
                log.exception("admitting jobs failed")
            if not progressed:
                self._wake.wait(self._idle_s)
                self._wake.clear()

    def _pending(self) -> list[uuid.UUID]:
        with self._services.sessions() as session:
            return list(session.scalars(select(JobSource.job_id)))

    def admit_chunk(self, job_id: uuid.UUID) -> bool:
        """Admit the job's next chunk; False when there was nothing to do for it now."""
        services = self._services
        fresh: list[Any] = []
        with services.sessions.begin() as session:
            source = session.scalar(
                select(JobSource)
                .where(JobSource.job_id == job_id)
                .with_for_update(skip_locked=True)
            )
            if source is None:
                self._uploads.pop(job_id, None)
                return False
            job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
            assert job is not None
            if job.cancelled_at is None:
                if _waiting(session, job_id) >= services.settings.admission_max_open:
                    return False  # enough of it waits already: admit more as it drains
                fresh = self._admit(session, job, source)
            done = job.cancelled_at is not None or source.cursor >= len(self._upload(source).lines)
            if done:
                self._finish(session, job, source)
        publish_requests(services, fresh)
        if done:
            self._close(job_id)
        return True

    def _admit(self, session: Session, job: Job, source: JobSource) -> list[Any]:
        upload = self._upload(source)
        if upload.cursor != source.cursor:  # another process admitted some: re-read its ids
            upload.first_seen, upload.cursor = _first_seen(session, job.id), source.cursor
        # Until this chunk commits: if it fails (the database went away), the ids it adds to
        # first_seen are re-read from the rows, not kept and taken for duplicates next time.
        upload.cursor = -1
        settings = self._services.settings
        size = settings.admission_chunk_lines if source.cursor else settings.admission_first_chunk
        chunk = (
            upload.lines[source.cursor :]
            if source.strict
            else upload.lines[source.cursor : source.cursor + size]
        )
        parsed = [
            (n, parse_line(n, raw, max_line_bytes=settings.max_line_bytes)) for n, raw in chunk
        ]
        prepared, errors = CHECKERS[source.format](
            self._services, job, source, parsed, upload.first_seen
        )
        if source.strict and errors:
            prepared = []
        session.add_all(
            JobError(job_id=job.id, line=e.line, item_id=e.item_id, message=e.message)
            for e in errors
        )
        fresh = insert_job_requests(session, prepared, job_id=job.id, deadline_at=job.deadline_at)
        job.total += len(prepared)
        job.invalid += len(errors)
        source.cursor += len(chunk)
        upload.cursor = source.cursor
        return fresh

    def _upload(self, source: JobSource) -> _Upload:
        upload = self._uploads.get(source.job_id)
        if upload is None:
            upload = self._uploads[source.job_id] = _Upload(source.content)
        return upload

    def _finish(self, session: Session, job: Job, source: JobSource) -> None:
        """Every line is checked (or the job was cancelled): the job runs, or fails."""
        session.delete(source)
        self._uploads.pop(job.id, None)
        if job.total or job.cancelled_at is not None:
            job.status = JobStatus.IN_PROGRESS
            return
        now = utcnow()
        job.status, job.finished_at = JobStatus.FAILED, now
        batch = session.scalar(select(Batch).where(Batch.job_id == job.id))
        if batch is not None:
            refused = session.scalars(
                select(JobError).where(JobError.job_id == job.id).order_by(JobError.line)
            )
            errors = [LineError(e.line, e.item_id, e.message) for e in refused]
            batch.status, batch.failed_at, batch.errors = "failed", now, refusals(errors)

    def _close(self, job_id: uuid.UUID) -> None:
        """Its requests may all have finished while it was being admitted."""
        services = self._services
        with services.sessions.begin() as session:
            deliveries = close_finished_jobs(session, [job_id], utcnow())
        publish_deliveries(services.celery, deliveries)


def _waiting(session: Session, job_id: uuid.UUID) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(Request)
            .where(Request.job_id == job_id, Request.status == RequestStatus.QUEUED)
        )
        or 0
    )


def _first_seen(session: Session, job_id: uuid.UUID) -> dict[str, int]:
    """Item ids already admitted or refused, with their first line, for duplicate checks."""
    seen: dict[str, int] = {}
    admitted = session.execute(
        select(Request.item_id, Request.line).where(Request.job_id == job_id)
    )
    refused = session.execute(
        select(JobError.item_id, JobError.line).where(JobError.job_id == job_id)
    )
    for item_id, line in [*admitted, *refused]:
        if item_id is not None and line is not None:
            seen[item_id] = min(line, seen.get(item_id, line))
    return seen
