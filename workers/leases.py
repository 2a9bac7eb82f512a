"""The requests a worker runs: claimed when their batch starts, vouched for while they run.

A claimed request's lease (``published_at``) is renewed every third of ``running_lease`` until
its result is committed. A worker that dies stops renewing; the reconciler then puts its
requests back on their queues, so a kill -9 costs at most a lease, not a visibility timeout.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from core.enums import Priority, RequestStatus
from core.settings import Settings
from storage.ledger import claim, hand_back
from storage.reconcile import forget_publish, renew, stopped_among
from storage.requests import lock_oldest_queued, queued_tenants
from tasks.contract import RunMessage
from tasks.rows import run_messages

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 5.0


class Leases:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        running_lease: timedelta = timedelta(seconds=20),
        max_deliveries: int = 5,
        worker: str | None = None,
    ) -> None:
        self._sessions = sessions
        self._worker = worker
        self._running_lease = running_lease
        self._max_deliveries = max_deliveries
        self._held: set[uuid.UUID] = set()
        # Leases are renewed only while this holds: a wedged engine stops vouching for its
        # requests, so the reconciler takes them back even if the process lingers.
        self.progressing: Callable[[], bool] = lambda: True
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="inferq-leases", daemon=True)

    @classmethod
    def from_settings(
        cls, settings: Settings, sessions: sessionmaker[Session], *, worker: str
    ) -> Leases:
        return cls(
            sessions,
            running_lease=timedelta(seconds=settings.running_lease_s),
            max_deliveries=settings.max_deliveries,
            worker=worker,
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5.0)

    def claim(self, request_ids: list[uuid.UUID], at: float) -> set[uuid.UUID]:
        """Claim a batch (see ``storage.ledger.claim``), waiting out a database outage."""
        backoff = 0.1
        while True:
            try:
                with self._sessions.begin() as session:
                    claimed = claim(
                        session,
                        request_ids,
                        datetime.fromtimestamp(at, UTC),
                        running_lease=self._running_lease,
                        max_deliveries=self._max_deliveries,
                        worker=self._worker,
                    )
                break
            except DBAPIError:
                if self._stopping.is_set():
                    raise
                log.warning("claiming a batch failed; retrying in %.1fs", backoff, exc_info=True)
                time.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
        with self._lock:
            self._held |= claimed
        return claimed

    def waiting(self, model: str, priority: Priority, limit: int) -> set[str]:
        """The tenants with requests queued on ``model`` (see ``storage.requests``)."""
        with self._sessions() as session:
            found = queued_tenants(session, model=model, priority=priority, limit=limit)
        return {str(tenant) for tenant in found}

    def claim_ahead(
        self, model: str, priority: Priority, ahead: dict[str, int], at: float
    ) -> list[RunMessage]:
        """Claim up to ``ahead[tenant]`` of each tenant's oldest queued requests, ahead of
        their messages (workers.fairness), and return their messages, rebuilt from the rows.
        Not retried: while the database is away the worker serves what it holds."""
        when = datetime.fromtimestamp(at, UTC)
        with self._sessions.begin() as session:
            rows = [
                row
                for tenant, count in ahead.items()
                for row in lock_oldest_queued(
                    session,
                    model=model,
                    priority=priority,
                    tenant_id=uuid.UUID(tenant),
                    limit=count,
                )
            ]
            if not rows:
                return []
            claimed = claim(
                session,
                [row.id for row in rows],
                when,
                running_lease=self._running_lease,
                max_deliveries=self._max_deliveries,
                worker=self._worker,
            )
            messages = run_messages([row for row in rows if row.id in claimed], when)
        with self._lock:
            self._held |= {uuid.UUID(m.request_id) for m in messages}
        return messages

    def stopped_among(self, request_ids: list[uuid.UUID]) -> dict[uuid.UUID, RequestStatus]:
        """Of the requests this worker runs, those to abort (see ``storage.reconcile``)."""
        with self._sessions.begin() as session:
            return stopped_among(session, request_ids, datetime.now(UTC))

    def hand_back(self, request_ids: list[uuid.UUID], *, ran: bool) -> set[uuid.UUID]:
        """Give back requests this worker holds (see ``storage.ledger.hand_back``); returns
        those back on ``queued``, for the caller to publish now. Not retried."""
        with self._sessions.begin() as session:
            requeued = hand_back(
                session, request_ids, datetime.now(UTC), worker=self._worker, ran=ran
            )
        with self._lock:
            self._held -= set(request_ids)
        return requeued

    def forget_published(self, request_ids: list[uuid.UUID]) -> None:
        """Their publish failed: the reconciler sends them on its next pass."""
        with self._sessions.begin() as session:
            forget_publish(session, request_ids)

    def release(self, request_id: uuid.UUID) -> None:
        """Its result is committed (or it was never claimed): stop vouching for it."""
        with self._lock:
            self._held.discard(request_id)

    def _loop(self) -> None:
        interval = self._running_lease.total_seconds() / 3
        while not self._stopping.wait(interval):
            with self._lock:
                held = list(self._held)
            if not held:
                continue
            if not self.progressing():
                log.warning("not renewing %d leases: the engine makes no progress", len(held))
                continue
            try:
                with self._sessions.begin() as session:
                    renew(session, held, datetime.now(UTC))
            except DBAPIError:  # the database is away; the lease is renewed when it is back
                log.warning("renewing %d leases failed", len(held), exc_info=True)
