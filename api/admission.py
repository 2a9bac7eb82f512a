"""Admitting large uploads in the background: check, insert and publish a chunk at a time.

An upload of more than ``settings.inline_job_lines`` lines is answered at once, its job
``validating``, and its raw lines wait in ``job_sources``. The :class:`Admitter` thread takes a
chunk at a time (a small first one, so the first result comes quickly, then each as long as
all before it up to ``admission_chunk_lines``, so many workers start soon; whole bundles of the
model's ``max_batch_size``, so no part-filled batch is left at a chunk's end), read from the source
a slice at a time (``api.job_source``: a 200 MB source is never whole in memory), checks it
with the same code as an inline upload, and in one transaction inserts its requests and
refused lines and advances the source's cursor; only after the commit does it publish them
(on a thread of its own, so the next chunk is checked and inserted while one goes out).
A restart resumes at the cursor, and a crash between commit and publish is the reconciler's
to repair.
While a job has ``admission_max_open`` requests waiting it is not admitted further, so a big
job fills its queue gradually and interactive work still gets in. Each chunk passes the same
limits as any request (``submission.limits``): past its tenant's requests in flight, a model's queue
or the tenant's tokens per minute, the job waits (a smaller chunk next time) rather than fail.

A strict job is checked whole before anything of it is inserted: one bad line fails it; once
every line passed, it is admitted gradually like any other.

No line stops a job, and no job stops another: a line whose check raises is refused with the
reason, and a chunk that fails is retried line by line, so the line at fault is refused alone.
A job whose admission keeps failing for a reason that is not a line's (a row it cannot read)
is retried with backoff ``admission_max_attempts`` times, then fails with the reason, while
the other jobs go on being admitted.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from api import job_source, openai_lines
from api import jobs as native
from api.jobs import LineError, parse_line
from api.line_checks import printable
from api.openai_lines import OPENAI, refusals
from core.enums import JobStatus, RequestStatus
from storage.events import close_finished_jobs
from storage.openai_files import Batch, batch_event
from storage.tables import Job, JobError, JobSource, Request, utcnow
from submission.limits import TooBusy
from submission.prepare import Prepared
from submission.services import Services
from submission.submit import Fresh, insert_job_requests, publish_requests
from tasks.webhooks import publish_deliveries

log = logging.getLogger(__name__)

Checked = tuple[list[Prepared], list[LineError]]
Seen = dict[str, int]  # item ids and the line each was first seen on


def _check_native(
    services: Services,
    job: Job,
    source: JobSource,
    lines: list[tuple[int, Any]],
    seen: dict[str, int],
) -> Checked:
    spec = native.spec_of(job, strict=source.strict)
    return native.check_lines(services, job.tenant_id, spec, lines, seen)


def _check_openai(
    services: Services,
    job: Job,
    source: JobSource,
    lines: list[tuple[int, Any]],
    seen: dict[str, int],
) -> Checked:
    del source
    endpoint = openai_lines.endpoint_of(job)
    return openai_lines.check_lines(services, job.tenant_id, lines, seen, endpoint=endpoint)


CHECKERS: dict[str, Callable[..., Checked]] = {
    native.NATIVE: _check_native,
    OPENAI: _check_openai,
}


class _Upload:
    """What is kept of a job between its chunks: where its cursor is in the source (read a
    slice at a time, ``api.job_source``), not the source."""

    def __init__(self) -> None:
        self.at = job_source.Position()  # walked forward to the cursor's line when behind it
        self.in_hand: bytes | None = None  # the upload's bytes, while its first chunk is admitted
        self.cursor = 0  # first_seen holds the ids of the lines before it (-1: re-read them)
        self.first_seen: dict[str, int] = {}
        self.careful = False  # the last chunk failed: insert the next one line by line
        self.cap: int | None = None  # lines a chunk may hold after a refusal for tokens

    def fetch(self, session: Session, job_id: uuid.UUID) -> job_source.Fetch:
        if self.in_hand is not None:
            return job_source.in_hand(self.in_hand)
        return job_source.stored(session, job_id)


@dataclass(slots=True)
class _Failing:
    """A job whose admission failed ``count`` times in a row; not tried before ``retry_at``."""

    count: int
    retry_at: float


class Admitter:
    """The background thread that admits validating jobs, one chunk per job in turn."""

    def __init__(self, services: Services, *, idle_s: float = 1.0) -> None:
        self._services = services
        self._idle_s = idle_s
        self._uploads: dict[uuid.UUID, _Upload] = {}
        self._failing: dict[uuid.UUID, _Failing] = {}
        self._events: dict[uuid.UUID, list[uuid.UUID]] = {}  # committed, to publish on close
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="inferq-admitter", daemon=True)
        # Committed chunks to publish, in order, on a thread of their own: the next chunk is
        # checked and inserted while the last one goes out (a stop publishes what is left).
        self._to_publish: queue.SimpleQueue[list[Fresh] | None] = queue.SimpleQueue()
        self._publisher = threading.Thread(
            target=self._publish_loop, name="inferq-admission-publisher", daemon=True
        )

    def start(self) -> None:
        self._publisher.start()
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)
        self._to_publish.put(None)
        if self._publisher.is_alive():
            self._publisher.join(timeout)

    def _publish(self, fresh: list[Fresh]) -> None:
        """After the commit: to the publisher thread while it runs, else here."""
        if not fresh:
            return
        if self._publisher.is_alive():
            self._to_publish.put(fresh)
        else:
            publish_requests(self._services, fresh)

    def _publish_loop(self) -> None:
        while (fresh := self._to_publish.get()) is not None:
            try:
                publish_requests(self._services, fresh)
            except Exception:  # committed: the reconciler publishes them once their lease ends
                log.exception("publishing %d admitted requests failed", len(fresh))

    def wake(self) -> None:
        """A job was stored: look for work now rather than at the next idle tick."""
        self._wake.set()

    def admit_first(self, job_id: uuid.UUID, content: bytes) -> None:
        """Admit a just-stored job's first chunk on the caller's thread, from the upload in
        hand (not read back), so its first results are on their way before the answer; the
        thread takes the rest, reading the source from the database."""
        upload = self._uploads.setdefault(job_id, _Upload())
        upload.in_hand = content
        try:
            self.admit_next(job_id)  # if it fails, the thread retries from the cursor
        finally:
            upload.in_hand = None
        self.wake()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            progressed = False
            try:
                pending = self._pending()
            except Exception:  # the database is down, say: try again on the next tick
                log.exception("listing the jobs to admit failed")
                pending = []
            for job_id in pending:
                progressed |= self.admit_next(job_id)
            if not progressed:
                self._wake.wait(self._idle_s)
                self._wake.clear()

    def admit_next(self, job_id: uuid.UUID) -> bool:
        """:meth:`admit_chunk`, counting its failures: none escapes to hold up other jobs."""
        failing = self._failing.get(job_id)
        if failing is not None and time.monotonic() < failing.retry_at:
            return False
        try:
            progressed = self.admit_chunk(job_id)
        except (OperationalError, DBAPIError) as exc:
            if isinstance(exc, OperationalError) or exc.connection_invalidated:
                log.warning("admitting job %s: the database is unreachable", job_id)
                return False  # not the job's fault: not counted
            self._failed(job_id, exc)
            return False
        except Exception as exc:
            self._failed(job_id, exc)
            return False
        self._failing.pop(job_id, None)
        return progressed

    def _failed(self, job_id: uuid.UUID, exc: Exception) -> None:
        """Retry the job's chunk line by line, with backoff; past the limit, fail the job."""
        log.warning("admitting job %s failed", job_id, exc_info=exc)
        upload = self._uploads.get(job_id)
        if upload is not None:
            upload.careful = True
        failing = self._failing.get(job_id) or _Failing(0, 0.0)
        failing.count += 1
        failing.retry_at = time.monotonic() + min(self._idle_s * 2 ** (failing.count - 1), 30.0)
        self._failing[job_id] = failing
        limit = self._services.settings.admission_max_attempts
        if failing.count < limit:
            return
        reason = printable(
            f"admission failed {failing.count} times in a row; the last time: "
            f"{type(exc).__name__}: {exc}"[:1000]
        )
        try:
            self._fail(job_id, reason)
        except Exception:  # the next try fails it
            log.exception("failing job %s failed", job_id)
            return
        self._failing.pop(job_id, None)

    def _pending(self) -> list[uuid.UUID]:
        with self._services.sessions() as session:
            return list(session.scalars(select(JobSource.job_id)))

    def admit_chunk(self, job_id: uuid.UUID) -> bool:
        """Admit the job's next chunk; False when there was nothing to do for it now."""
        services = self._services
        fresh: list[Fresh] = []
        more = False
        with services.sessions.begin() as session:
            row = JobSource.job_id == job_id
            source = session.scalar(select(JobSource).where(row).with_for_update(skip_locked=True))
            if source is None:  # done, or another admits a chunk of it now
                if session.scalar(select(JobSource.job_id).where(row)) is None:
                    self._uploads.pop(job_id, None)
                return False
            job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
            assert job is not None
            if job.cancelled_at is None:
                if _waiting(session, job_id) >= services.settings.admission_max_open:
                    return False  # enough of it waits already: admit more as it drains
                # A strict job that fails its check is done: every line is accounted for.
                if not source.strict or self._strict_passes(session, job, source):
                    room = services.limits.room(job.tenant_id) if services.limits else None
                    if room == 0:
                        return False  # the tenant has all it may in flight: wait for it
                    try:
                        with session.begin_nested():
                            fresh, more = self._admit(session, job, source, room=room)
                    except TooBusy as busy:
                        self._held(job_id, busy)
                        return False
            done = job.cancelled_at is not None or not more
            if done:
                self._finish(session, job, source)
        self._publish(fresh)
        if done:
            self._close(job_id)
        return True

    def _held(self, job_id: uuid.UUID, busy: TooBusy) -> None:
        """A limit holds the job back: try a smaller chunk next time, so a chunk whose tokens
        exceed what a minute allows gets in a part at a time."""
        upload = self._uploads.get(job_id)
        if upload is not None and upload.cap != 1:
            upload.cap = max((upload.cap or self._services.settings.admission_chunk_lines) // 2, 1)
        log.debug("admitting job %s waits: %s", job_id, busy)

    def _admit(
        self, session: Session, job: Job, source: JobSource, *, room: int | None
    ) -> tuple[list[Fresh], bool]:
        """Admit the next chunk; also whether any line is left after it."""
        upload = self._upload(job.id)
        if upload.cursor != source.cursor:  # another process admitted some: re-read its ids
            upload.first_seen, upload.cursor = _first_seen(session, job.id), source.cursor
        # Until this chunk commits: if it fails (the database went away), the ids it adds to
        # first_seen are re-read from the rows, not kept and taken for duplicates next time.
        upload.cursor = -1
        settings = self._services.settings
        # Chunks grow from the first one, each as long as all admitted before it, up to
        # ``admission_chunk_lines``: many workers all get a first bundle soon, not after a
        # whole large chunk has been checked.
        first, most = settings.admission_first_chunk, settings.admission_chunk_lines
        size = min(max(first, source.cursor), most) if source.cursor else first
        size = _whole_bundles(self._services, job, min(size, upload.cap or size, room or size))
        fetch = upload.fetch(session, job.id)
        upload.at = job_source.seek(fetch, upload.at, source.cursor)  # already there, mostly
        chunk = job_source.read(fetch, upload.at, size)
        prepared, errors = self._check(job, source, chunk.lines, upload.first_seen)
        prepared, errors = self._within_budget(prepared, errors)
        if self._services.limits is not None:
            self._services.limits.admit(prepared)  # TooBusy: the caller holds the job
        if upload.careful:
            fresh, errors = _insert_each(session, job, prepared, errors)
        else:
            session.add_all(_error_rows(job, errors))
            fresh = insert_job_requests(
                session, prepared, job_id=job.id, deadline_at=job.deadline_at
            )
        job.total += len(fresh)
        job.invalid += len(errors)
        source.cursor += len(chunk.lines)
        upload.cursor, upload.at = source.cursor, chunk.after
        upload.careful = False
        if upload.cap is not None:  # it fitted: try larger chunks again
            upload.cap = upload.cap * 2 if upload.cap * 2 < settings.admission_chunk_lines else None
        return fresh, chunk.more

    def _check(
        self, job: Job, source: JobSource, chunk: Sequence[tuple[int, bytes]], seen: Seen
    ) -> Checked:
        max_line_bytes = self._services.settings.max_line_bytes
        parsed = [(n, parse_line(n, raw, max_line_bytes=max_line_bytes)) for n, raw in chunk]
        return CHECKERS[source.format](self._services, job, source, parsed, seen)

    def _strict_passes(self, session: Session, job: Job, source: JobSource) -> bool:
        """Check every line of a strict job, a chunk at a time, before any is admitted. If one
        fails, the job fails with its refused lines; else it is admitted like any other."""
        upload = self._upload(job.id)
        fetch = upload.fetch(session, job.id)
        seen: Seen = {}
        errors: list[LineError] = []
        for chunk in job_source.chunks(fetch, self._services.settings.admission_chunk_lines):
            errors += self._check(job, source, chunk.lines, seen)[1]
        if not errors:
            source.strict = False
            return True
        session.add_all(_error_rows(job, errors))
        job.invalid += len(errors)
        source.cursor = upload.cursor = chunk.after.index
        upload.at = chunk.after
        return False

    def _within_budget(self, prepared: list[Prepared], errors: list[LineError]) -> Checked:
        """A line that alone needs more tokens than its tenant may use in a minute would
        wait forever: it is refused instead."""
        limits = self._services.limits
        if limits is None:
            return prepared, errors
        kept, refused = [], list(errors)
        for item in prepared:
            why = limits.over_budget(item)
            if why is None:
                kept.append(item)
            else:
                refused.append(LineError(item.line or 0, item.item_id, why))
        return kept, sorted(refused, key=lambda e: e.line)

    def _upload(self, job_id: uuid.UUID) -> _Upload:
        return self._uploads.setdefault(job_id, _Upload())

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
            self._events[job.id] = batch_event(
                session, tenant_id=job.tenant_id, batch_id=batch.id, status=JobStatus.FAILED
            )

    def _fail(self, job_id: uuid.UUID, reason: str) -> None:
        """Stop admitting the job: what was admitted runs, the rest is refused with why."""
        with self._services.sessions.begin() as session:
            source = session.scalar(
                select(JobSource).where(JobSource.job_id == job_id).with_for_update()
            )
            if source is None:
                return
            job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
            assert job is not None
            upload = self._uploads.pop(job_id, None) or _Upload()
            line = _line_at(session, source, upload.at)
            error = LineError(
                line, None, f"this line and those after it were not admitted: {reason}"
            )
            session.add_all(_error_rows(job, [error]))
            session.delete(source)
            job.status = JobStatus.FAILED
            batch = session.scalar(select(Batch).where(Batch.job_id == job.id))
            if batch is not None:
                batch.status, batch.failed_at, batch.errors = "failed", utcnow(), refusals([error])
        log.error("job %s failed: %s", job_id, reason)
        self._close(job_id)

    def _close(self, job_id: uuid.UUID) -> None:
        """Its requests may all have finished while it was being admitted."""
        services = self._services
        with services.sessions.begin() as session:
            deliveries = close_finished_jobs(session, [job_id], utcnow())
        publish_deliveries(services.celery, [*self._events.pop(job_id, []), *deliveries])


def _whole_bundles(services: Services, job: Job, size: int) -> int:
    """A chunk of whole bundles (``max_batch_size`` requests a message; of every model, when
    the job names none) where it holds at least two: a part-filled bundle at every chunk's end
    would be a short batch, and the worker holding its remainder would run one batch more
    than the rest at a job's end."""
    models = services.config.models
    named = models.get(job.model) if job.model else None
    specs = [named] if named is not None else list(models.values())
    bundle = math.lcm(*(spec.max_batch_size for spec in specs)) if specs else 1
    return size - size % bundle if size >= 2 * bundle else size


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


def _line_at(session: Session, source: JobSource, at: job_source.Position) -> int:
    """The number of the cursor's line (a guess if the source cannot be read)."""
    try:
        with session.begin_nested():
            fetch = job_source.stored(session, source.job_id)
            number = job_source.number_of(fetch, at, source.cursor)
    except DBAPIError:
        number = None
    return number or source.cursor + 1


def _error_rows(job: Job, errors: Sequence[LineError]) -> list[JobError]:
    return [
        JobError(job_id=job.id, line=e.line, item_id=e.item_id, message=printable(e.message))
        for e in errors
    ]


def _insert_each(
    session: Session, job: Job, prepared: Sequence[Prepared], errors: Sequence[LineError]
) -> tuple[list[Fresh], list[LineError]]:
    """After a failed chunk: insert line by line, each in a savepoint, so a line the database
    refuses is refused alone. If every line is refused, the fault is not theirs: raise."""
    fresh: list[Fresh] = []
    refused = list(errors)
    last: DBAPIError | None = None
    for item in prepared:
        try:
            with session.begin_nested():
                fresh += insert_job_requests(
                    session, [item], job_id=job.id, deadline_at=job.deadline_at
                )
        except DBAPIError as exc:
            if isinstance(exc, OperationalError) or exc.connection_invalidated:
                raise
            last = exc
            why = printable(f"the line could not be stored: {exc.orig}"[:300])
            refused.append(LineError(item.line or 0, None, why))
    if last is not None and not fresh and len(prepared) > 1:
        raise last
    refused.sort(key=lambda e: e.line)
    for row in _error_rows(job, refused):
        try:
            with session.begin_nested():
                session.add(row)
        except DBAPIError:
            with session.begin_nested():
                why = "the line was refused; the reason could not be stored"
                session.add(JobError(job_id=job.id, line=row.line, item_id=None, message=why))
    return fresh, refused
