"""Writes finished requests to the database on its own thread, then releases their messages.

What finished since the last commit (a batch, or a continuous engine's last few steps) goes in
one transaction with its ledger rows; only after the commit are the
waiting tasks released, so Celery acknowledges a message once its result is durable.

A commit that fails for the connection's sake (the database away or restarting, a deadlock)
is retried with backoff: the results are kept, never dropped. Any other failure is about the
data: the group is split, as the executor splits a failing batch, until the request that
cannot be stored is alone; it is stored as failed with the reason and the rest commit.
Retrying such a commit forever would hold every request of the group while their leases
kept being renewed, so nothing would ever take them back.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from core.enums import Outcome
from storage.events import close_finished_jobs, request_completed
from storage.ledger import Attempt, record_batch
from storage.tables import utcnow
from tasks.contract import RunMessage
from workers.batcher import WorkItem

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 10.0
_MAX_GROUP = 512  # requests committed in one transaction, at most
_LINGER_S = 0.02  # how long a commit waits for more finished requests to join it

CommitHook = Callable[[list[Attempt], list[Outcome]], None]
TransactionHook = Callable[[Session, list[Attempt], list[Outcome]], None]


@dataclass(frozen=True, slots=True)
class _Finished:
    items: list[WorkItem]
    attempts: list[Attempt]

    def halves(self) -> tuple[_Finished, _Finished]:
        middle = len(self.items) // 2
        return (
            _Finished(self.items[:middle], self.attempts[:middle]),
            _Finished(self.items[middle:], self.attempts[middle:]),
        )


class _Stopped(Exception):
    """The worker stopped while the database was away: what is not committed stays open."""


class BatchWriter:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        publish_deliveries: Callable[[list[uuid.UUID]], None],
        publish_runs: Callable[[list[RunMessage]], None] | None = None,
    ) -> None:
        self._sessions = sessions
        self._publish_deliveries = publish_deliveries
        # Requests that fell back, sent on to their next model's queue after the commit.
        self._publish_runs = publish_runs
        self._commit_hooks: list[CommitHook] = []
        self._transaction_hooks: list[TransactionHook] = []
        self._jobs: queue.SimpleQueue[_Finished | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="inferq-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)
        self._stopping.set()

    def add_commit_hook(self, hook: CommitHook) -> None:
        """Call ``hook(attempts, outcomes)`` after each committed batch (metrics, say)."""
        self._commit_hooks.append(hook)

    def add_transaction_hook(self, hook: TransactionHook) -> None:
        """Call ``hook(session, attempts, outcomes)`` inside each batch's transaction, so what
        it writes (evaluation samples, say) commits or rolls back with the results."""
        self._transaction_hooks.append(hook)

    def finished(self, items: list[WorkItem], attempts: list[Attempt]) -> None:
        self._jobs.put(_Finished(items, attempts))

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            # What finishes within _LINGER_S joins this transaction: a continuous engine hands
            # over a few requests per step, and a commit each would cost more than the step.
            stop = False
            until = time.monotonic() + _LINGER_S
            while len(job.items) < _MAX_GROUP:
                try:
                    more = self._jobs.get(timeout=max(until - time.monotonic(), 0.0))
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                job = _Finished(job.items + more.items, job.attempts + more.attempts)
            self._record(job)
            if stop:
                return

    def _record(self, job: _Finished) -> None:
        try:
            self._store(job)
        except _Stopped:
            error = RuntimeError("worker stopped before the batch was committed")
            for item in job.items:
                if not item.future.done():
                    item.future.set_exception(error)

    def _store(self, job: _Finished) -> None:
        """Commit a group; on a data error, split it until the culprit is alone."""
        try:
            outcomes, deliveries = self._commit(job)
        except _Stopped:
            raise
        except Exception as exc:
            if len(job.items) > 1:
                log.warning("committing %d results failed (%s); splitting", len(job.items), exc)
                for half in job.halves():
                    self._store(half)
                return
            self._store_unstorable(job, exc)
            return
        self._settle(job, outcomes, deliveries)

    def _store_unstorable(self, job: _Finished, exc: Exception) -> None:
        """One request whose result the database refused: store it as failed, with why."""
        [item], [attempt] = job.items, job.attempts
        log.error("request %s: its result could not be stored: %s", attempt.request_id, exc)
        failed = _Finished([item], [_unstorable(attempt, exc)])
        try:
            outcomes, deliveries = self._commit(failed)
        except _Stopped:
            raise
        except Exception as again:  # left open: its lease lapses, the delivery cap ends it
            log.exception("request %s: not even its failure could be stored", attempt.request_id)
            item.future.set_exception(again)
            return
        self._settle(failed, outcomes, deliveries)

    def _commit(self, job: _Finished) -> tuple[list[Outcome], list[uuid.UUID]]:
        """One transaction for the group, retried while the connection is the problem.

        Raises:
            _Stopped: the worker stopped before the database came back.
            Exception: anything else, which is about the data.
        """
        backoff = 0.1
        while True:
            try:
                with self._sessions.begin() as session:
                    outcomes = record_batch(session, job.attempts)
                    for in_transaction in self._transaction_hooks:
                        in_transaction(session, job.attempts, outcomes)
                    return outcomes, _events(session, job, outcomes)
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                if self._stopping.is_set():
                    raise _Stopped from exc
                log.warning("commit failed; retrying in %.1fs", backoff, exc_info=True)
                time.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)

    def _settle(self, job: _Finished, outcomes: list[Outcome], deliveries: list[uuid.UUID]) -> None:
        """After a commit: publish what follows from it, release the tasks, run the hooks."""
        self._publish(deliveries, _fallen_back(job, outcomes))
        for item, outcome in zip(job.items, outcomes, strict=True):
            if not item.future.done():  # else handed back at a drain's deadline
                item.future.set_result(outcome)
        for hook in self._commit_hooks:
            try:
                hook(job.attempts, outcomes)
            except Exception:  # a hook never holds up or breaks the writer
                log.exception("commit hook %r failed", hook)

    def _publish(self, deliveries: list[uuid.UUID], moved: list[tuple[float, RunMessage]]) -> None:
        """After the commit: webhook deliveries, and requests moving down their chains."""
        if deliveries:
            try:
                self._publish_deliveries(deliveries)
            except Exception:  # recorded as pending; a replay or a reconciler sends them
                log.exception("publishing %d webhook deliveries failed", len(deliveries))
        by_delay: dict[float, list[RunMessage]] = {}
        for delay, message in moved:
            by_delay.setdefault(delay, []).append(message)
        for delay, messages in by_delay.items():
            if not delay:
                self._send_runs(messages)
                continue
            timer = threading.Timer(delay, self._send_runs, args=(messages,))
            timer.daemon = True  # if the worker dies first, the reconciler sends them
            timer.start()

    def _send_runs(self, messages: list[RunMessage]) -> None:
        if self._publish_runs is None:
            return
        try:
            self._publish_runs(messages)
        except Exception:  # committed as queued on the next model; the reconciler sends them
            log.exception("publishing %d fallen-back requests failed", len(messages))


def _events(session: Session, job: _Finished, outcomes: list[Outcome]) -> list[uuid.UUID]:
    """Webhook deliveries for this batch: finished requests, and jobs it finished."""
    finished = [
        (a.request_id, a.tenant_id, item.message.webhook_url, outcome)
        for item, a, outcome in zip(job.items, job.attempts, outcomes, strict=True)
        if item.message.webhook_url and not a.falls_back
    ]
    deliveries = request_completed(session, finished) if finished else []
    job_ids = {uuid.UUID(item.message.job_id) for item in job.items if item.message.job_id}
    if job_ids:
        deliveries += close_finished_jobs(session, job_ids, utcnow())
    return deliveries


def _fallen_back(job: _Finished, outcomes: list[Outcome]) -> list[tuple[float, RunMessage]]:
    """The messages that carry requests on to the next model of their chains (or retry
    them on the same model), each with how long to wait before sending it."""
    now = time.time()
    return [
        (
            a.retry_in_s or 0.0,
            item.message.model_copy(
                update={
                    "model": a.fallbacks[0],
                    "fallbacks": list(a.fallbacks[1:]) or None,
                    "enqueued_at": now,
                    "attempt": item.message.attempt + 1 if a.retry_in_s is not None else 1,
                }
            ),
        )
        for item, a, outcome in zip(job.items, job.attempts, outcomes, strict=True)
        if a.falls_back and outcome is Outcome.FAILED
    ]


# SQLSTATE classes of trouble with the connection or the server, not with what was sent:
# connection exceptions, transaction rollbacks (deadlock, serialization), insufficient
# resources, operator intervention (shutdown, restart) and system errors.
_TRANSIENT_CLASSES = frozenset({"08", "40", "53", "57", "58"})


def is_connection_error(exc: BaseException) -> bool:
    """Whether a failed commit may succeed unchanged later: the connection or the server
    was the problem, not the data sent."""
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        sqlstate = getattr(exc.orig, "sqlstate", None)
        if sqlstate:
            return str(sqlstate)[:2] in _TRANSIENT_CLASSES
        # No SQLSTATE: the client lost or never got a connection (or SQLite is locked).
        return isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)
    return isinstance(exc, sa_exc.TimeoutError | sa_exc.DisconnectionError)


def _storable(text: str) -> str:
    """Text the database can keep: no NUL, no lone surrogates."""
    return text.replace("\x00", "\\0").encode("utf-8", "backslashreplace").decode("utf-8")


def _unstorable(attempt: Attempt, exc: Exception) -> Attempt:
    """The attempt as a final failure whose reason is why its result could not be stored."""
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:500]
    error = f"the result could not be stored: {type(exc).__name__}: {reason}"
    if attempt.error:
        error += f" (the attempt's own error: {attempt.error[:500]})"
    return replace(
        attempt,
        succeeded=False,
        output=None,
        error=_storable(error),
        finish_reason=_storable(attempt.finish_reason) if attempt.finish_reason else None,
        fallbacks=(),
        retry_in_s=None,
    )
