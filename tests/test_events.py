"""Completion events are recorded with the results: once per request, once per job."""

from __future__ import annotations

import threading
import uuid

from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from core.enums import Outcome, Priority, RequestStatus, TaskKind
from storage.events import close_finished_jobs, request_completed
from storage.tables import Job, Request, Tenant, utcnow
from storage.webhooks import WebhookDelivery
from tests.conftest import wait_for

URL = "https://hooks.example.com/inferq"


def make_job(
    sessions: sessionmaker[Session], statuses: list[RequestStatus]
) -> tuple[uuid.UUID, uuid.UUID, list[uuid.UUID]]:
    with sessions.begin() as session:
        tenant = Tenant(name=f"events-{uuid.uuid4().hex[:8]}")
        session.add(tenant)
        session.flush()
        job = Job(
            id=uuid.uuid4(),
            tenant_id=tenant.id,
            task=TaskKind.COMPLETE,
            total=len(statuses),
            webhook_url=URL,
        )
        session.add(job)
        session.flush()
        rows = [
            Request(
                tenant_id=tenant.id,
                job_id=job.id,
                task=TaskKind.COMPLETE,
                status=status,
                priority=Priority.BATCH,
                model="s",
                input={"prompt": "x"},
                params={},
                output="done",
            )
            for status in statuses
        ]
        session.add_all(rows)
        session.flush()
        return tenant.id, job.id, [r.id for r in rows]


def deliveries(sessions: sessionmaker[Session], tenant_id: uuid.UUID) -> list[WebhookDelivery]:
    with sessions() as session:
        return list(
            session.scalars(select(WebhookDelivery).where(WebhookDelivery.tenant_id == tenant_id))
        )


def test_job_completed_is_announced_once_when_nothing_is_left(
    sessions: sessionmaker[Session],
) -> None:
    tenant_id, job_id, ids = make_job(sessions, [RequestStatus.SUCCEEDED, RequestStatus.RUNNING])
    with sessions.begin() as session:
        assert close_finished_jobs(session, [job_id], utcnow()) == []  # one still running
    with sessions.begin() as session:
        session.get(Request, ids[1]).status = RequestStatus.FAILED  # type: ignore[union-attr]
    with sessions.begin() as session:
        [first] = close_finished_jobs(session, [job_id], utcnow())
    with sessions.begin() as session:
        assert close_finished_jobs(session, [job_id], utcnow()) == []  # already closed
    [delivery] = deliveries(sessions, tenant_id)
    assert delivery.id == first and delivery.event_type == "job.completed"
    assert delivery.payload["counts"] == {"succeeded": 1, "failed": 1}
    assert delivery.payload["status"] == "completed"


def test_request_completed_skips_duplicates(sessions: sessionmaker[Session]) -> None:
    tenant_id, _job_id, ids = make_job(sessions, [RequestStatus.SUCCEEDED])
    with sessions.begin() as session:
        made = request_completed(
            session,
            [
                (ids[0], tenant_id, URL, Outcome.SUCCEEDED),
                (ids[0], tenant_id, URL, Outcome.DUPLICATE),
            ],
        )
    [delivery] = deliveries(sessions, tenant_id)
    assert made == [delivery.id] and delivery.event_type == "request.completed"
    assert delivery.payload["output"] == "done" and delivery.payload["id"] == str(ids[0])


def test_two_writers_finishing_a_job_together_stamp_it(sessions: sessionmaker[Session]) -> None:
    """Each of two transactions commits one of the job's last two requests; neither sees the
    other's before it commits, yet the job must be stamped finished (once)."""
    _tenant_id, job_id, ids = make_job(sessions, [RequestStatus.RUNNING, RequestStatus.RUNNING])
    first = sessions()
    first.begin()
    first.get(Request, ids[0]).status = RequestStatus.SUCCEEDED  # type: ignore[union-attr]
    assert close_finished_jobs(first, [job_id], utcnow()) == []  # the other is open
    closed: list[list[uuid.UUID]] = []

    def second() -> None:
        with sessions.begin() as session:
            session.get(Request, ids[1]).status = RequestStatus.SUCCEEDED  # type: ignore[union-attr]
            closed.append(close_finished_jobs(session, [job_id], utcnow()))

    thread = threading.Thread(target=second)
    thread.start()
    # The second either waits for the first (Postgres) or has finished: commit the first then.
    wait_for(lambda: not thread.is_alive() or _waits_on_a_lock(sessions), timeout=30, what="lock")
    first.commit()
    first.close()
    thread.join(30)
    with sessions() as session:
        assert session.get(Job, job_id).finished_at is not None  # type: ignore[union-attr]
    assert len(closed) == 1 and len(closed[0]) == 1  # job.completed, once


def _waits_on_a_lock(sessions: sessionmaker[Session]) -> bool:
    with sessions() as session:
        waiting = session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    return bool(waiting)
