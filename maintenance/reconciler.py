"""The reconciler: Postgres is the truth, Redis the transport; this re-sends what was lost.

Every ``reconcile_interval_s`` it expires queued requests past their deadline (closing their
jobs) and re-publishes requests whose lease ran out (``storage.reconcile``): a lost or
flushed Redis message, a worker killed mid-batch, an API that died between its commit and its
publish. Messages are rebuilt from the rows with the mapping the API publishes with
(``tasks.rows``). Reconcilers in several processes share the work: rows are taken with
``FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from router.config import RouterConfig
from storage import reconcile
from storage.events import close_finished_jobs
from storage.tables import utcnow
from tasks.app import publish_runs
from tasks.holdings import redis_client, take_dead
from tasks.rows import run_messages
from tasks.webhooks import publish_deliveries

log = logging.getLogger(__name__)

BATCH_LIMIT = 5000  # requests of each model re-published in one pass, at most
_NEVER = timedelta(days=365 * 100)


@dataclass(frozen=True, slots=True)
class Pass:
    """What one pass did, for logs and tests."""

    republished: int
    expired: int


class Reconciler:
    def __init__(
        self,
        settings: Settings,
        config: RouterConfig,
        sessions: sessionmaker[Session],
        celery: Celery,
    ) -> None:
        self._settings = settings
        self._config = config
        self._sessions = sessions
        self._celery = celery
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="inferq-reconciler", daemon=True)
        # After an outage, workers get one lease to renew before their work counts as orphaned:
        # they could not renew while the database was away.
        self._in_outage = False
        self._grace_until = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(10.0)

    def _loop(self) -> None:
        while not self._stopping.wait(self._settings.reconcile_interval_s):
            try:
                done = self.run_once()
            except Exception:  # Postgres or Redis is down: try again next time
                log.warning("reconciling failed", exc_info=True)
                self._in_outage = True
                continue
            if done.republished or done.expired:
                log.info("re-published %d requests, expired %d", done.republished, done.expired)

    def run_once(self) -> Pass:
        now = utcnow()
        settings = self._settings
        if self._in_outage:
            self._in_outage = False
            self._grace_until = time.monotonic() + settings.running_lease_s
        running_lease = timedelta(seconds=settings.running_lease_s)
        if time.monotonic() < self._grace_until:
            running_lease = _NEVER
        with self._sessions.begin() as session:
            jobs = reconcile.expire_overdue(session, now)
            deliveries = close_finished_jobs(session, jobs, now) if jobs else []
        publish_deliveries(self._celery, deliveries)
        orphaned = self._take_orphaned()
        with self._sessions.begin() as session:
            if orphaned:  # sent below with what else is lost, not after the queued lease
                reconcile.forget_publish(session, orphaned)
            lost = reconcile.take_lost(
                session,
                now,
                queued_lease=timedelta(seconds=settings.queued_lease_s),
                running_lease=running_lease,
                models=list(self._config.models),
                limit=BATCH_LIMIT,
            )
            messages = run_messages(lost, now)  # fails rows stored before today's checks
        if messages:
            publish_runs(self._celery, self._config, messages)
        return Pass(republished=len(messages), expired=len(jobs))

    def _take_orphaned(self) -> list[uuid.UUID]:
        """The requests dead workers held (``tasks.holdings``): prefetched messages that
        would otherwise sit unacknowledged in Redis for the visibility timeout."""
        try:
            with redis_client(self._celery) as client:
                return [] if client is None else take_dead(client)
        except Exception:  # Redis is away: the queued lease still brings them back
            log.warning("reading the workers' holdings failed", exc_info=True)
            return []
