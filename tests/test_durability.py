"""Postgres is the truth, Redis the transport: lost messages, dead workers, duplicate
deliveries, worn-out requests, overdue work and unreachable services, on real parts."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from core.enums import Outcome, Priority, RequestStatus, TaskKind
from core.settings import Settings
from maintenance.reconciler import Reconciler
from router import load_config
from storage.tables import Job, LedgerEntry, Request
from tasks.app import create_celery
from tasks.contract import RunMessage
from tasks.rows import run_message
from tests.conftest import new_tenant, wait_for
from tests.test_worker_pipeline import CONFIG
from workers.engines.scripted import Rule, ScriptedEngine
from workers.leases import Leases
from workers.runtime import WorkerRuntime

LONG_AGO = datetime.now(UTC) - timedelta(hours=1)
DEAD_PORT = 1  # nothing listens there


@pytest.fixture
def reconciler(settings: Settings, sessions: sessionmaker[Session]) -> Reconciler:
    config = load_config(settings.config)
    return Reconciler(settings, config, sessions, create_celery(settings, config))


def row(tenant_id: uuid.UUID, prompt: str, *, model: str = "scripted", **values: object) -> Request:
    fields: dict[str, object] = {
        "tenant_id": tenant_id,
        "task": TaskKind.COMPLETE,
        "status": RequestStatus.QUEUED,
        "priority": Priority.BATCH,
        "model": model,
        "input": {"prompt": prompt},
        "params": {"max_tokens": 4},
        **values,
    }
    return Request(**fields)


def add(sessions: sessionmaker[Session], *rows: Request) -> list[uuid.UUID]:
    with sessions.begin() as session:
        session.add_all(rows)
        session.flush()
        return [r.id for r in rows]


def status_of(sessions: sessionmaker[Session], request_id: uuid.UUID) -> Request:
    with sessions() as session:
        found = session.get(Request, request_id)
        assert found is not None
        session.expunge(found)
        return found


def executions(sessions: sessionmaker[Session], request_id: uuid.UUID) -> list[Outcome]:
    with sessions() as session:
        query = select(LedgerEntry.outcome).where(LedgerEntry.request_id == request_id)
        # In the order they ran: without ORDER BY, Postgres returns rows in heap order, which
        # differs from it once space freed by other tests' rows is reused.
        return list(session.scalars(query.order_by(LedgerEntry.created_at)))


def finished(sessions: sessionmaker[Session], request_id: uuid.UUID) -> Request:
    wait_for(
        lambda: status_of(sessions, request_id).status.terminal,
        timeout=120,
        what=f"request {request_id} to finish",
    )
    return status_of(sessions, request_id)


def test_unpublished_and_orphaned_requests_are_republished_and_run_once(
    workers: object,
    reconciler: Reconciler,
    sessions: sessionmaker[Session],
    tenant_id: uuid.UUID,
) -> None:
    never_sent, worker_died = add(
        sessions,
        row(tenant_id, "committed, then the API crashed", published_at=None),
        row(
            tenant_id,
            "claimed by a worker killed mid-batch",
            status=RequestStatus.RUNNING,
            published_at=LONG_AGO,
            started_at=LONG_AGO,
            deliveries=1,
        ),
    )
    reconciler.run_once()  # the API's own reconciler may get there first: both are fine
    for request_id, deliveries in ((never_sent, 1), (worker_died, 2)):
        done = finished(sessions, request_id)
        assert done.status is RequestStatus.SUCCEEDED
        assert done.deliveries == deliveries
        assert executions(sessions, request_id) == [Outcome.SUCCEEDED]


def test_a_stored_request_that_no_longer_renders_fails_and_the_pass_goes_on(
    reconciler: Reconciler, sessions: sessionmaker[Session], tenant_id: uuid.UUID
) -> None:
    """A row kept from before today's parameter checks fails with the reason; the rest of
    the pass is not rolled back with it."""
    broken, fine = add(
        sessions,
        row(tenant_id, "old", published_at=None, params={"seed": 2**64, "temperature": 0.8}),
        row(tenant_id, "new", model="parked", published_at=None),
    )
    assert reconciler.run_once().republished >= 1
    failed = status_of(sessions, broken)
    assert failed.status is RequestStatus.FAILED
    assert "seed" in (failed.error or "")
    assert status_of(sessions, fine).published_at is not None  # sent, in the same pass


def test_overdue_queued_requests_expire_and_their_job_closes(
    reconciler: Reconciler, sessions: sessionmaker[Session], tenant_id: uuid.UUID
) -> None:
    job = Job(tenant_id=tenant_id, task=TaskKind.COMPLETE, total=1)
    with sessions.begin() as session:
        session.add(job)
    [request_id] = add(
        sessions,
        row(tenant_id, "too late", model="parked", job_id=job.id, deadline_at=LONG_AGO),
    )
    reconciler.run_once()
    expired = status_of(sessions, request_id)
    assert expired.status is RequestStatus.EXPIRED
    assert executions(sessions, request_id) == []
    with sessions() as session:
        closed = session.get(Job, job.id)
        assert closed is not None and closed.finished_at is not None


@pytest.fixture
def runtime(
    make_runtime: Callable[..., WorkerRuntime], sessions: sessionmaker[Session]
) -> WorkerRuntime:
    """An in-process worker whose batches take a second, with a short lease renewed meanwhile."""
    return make_runtime(
        ScriptedEngine(rules=[Rule(match="SLOW", delay_s=1.5)]),
        config=CONFIG,
        model="s",
        worker_name="durable",
        leases=Leases(sessions, running_lease=timedelta(seconds=0.6), max_deliveries=3),
    )


def message(sessions: sessionmaker[Session], request_id: uuid.UUID) -> RunMessage:
    """The message published for a stored request."""
    with sessions() as session:
        stored = session.get(Request, request_id)
        assert stored is not None
        return run_message(stored)


def test_same_message_twice_while_running_runs_once(
    runtime: WorkerRuntime, sessions: sessionmaker[Session], tenant_id: uuid.UUID
) -> None:
    [request_id] = add(sessions, row(tenant_id, "SLOW", model="s"))
    sent = message(sessions, request_id)
    first = runtime.submit(sent)
    wait_for(
        lambda: status_of(sessions, request_id).status is RequestStatus.RUNNING,
        timeout=30,
        what="the first delivery to start",
    )
    # The lease (0.6 s) is renewed while the 1.5 s batch runs, so a second delivery now
    # finds a live worker holding it and is settled without running.
    wait_for(
        lambda: (
            status_of(sessions, request_id).published_at
            > status_of(sessions, request_id).started_at
        ),
        timeout=30,
        what="the running worker to renew its lease",
    )
    second = runtime.submit(sent)
    assert second.result(timeout=60) is Outcome.CANCELLED
    assert first.result(timeout=60) is Outcome.SUCCEEDED
    assert executions(sessions, request_id) == [Outcome.SUCCEEDED]


def test_request_delivered_too_often_fails_with_the_reason(
    runtime: WorkerRuntime, sessions: sessionmaker[Session], tenant_id: uuid.UUID
) -> None:
    [request_id] = add(
        sessions,
        row(
            tenant_id,
            "kills every worker",
            model="s",
            status=RequestStatus.RUNNING,
            published_at=LONG_AGO,
            deliveries=3,
        ),
    )
    outcome = runtime.submit(message(sessions, request_id))
    assert outcome.result(timeout=60) is Outcome.CANCELLED  # settled unrun
    worn = status_of(sessions, request_id)
    assert worn.status is RequestStatus.FAILED
    assert worn.error is not None and "more than 3 times" in worn.error
    assert executions(sessions, request_id) == []


def test_api_accepts_while_redis_is_down_and_the_reconciler_sends_later(
    settings: Settings,
    workers: object,
    reconciler: Reconciler,
    sessions: sessionmaker[Session],
) -> None:
    tenant = new_tenant(sessions, "no-redis")
    key = tenant.key
    cut_off = settings.model_copy(
        update={"broker_url": f"redis://127.0.0.1:{DEAD_PORT}/0", "reconciler": False}
    )
    with TestClient(create_app(cut_off)) as api:
        response = api.post(
            "/v1/requests",
            headers={"Authorization": f"Bearer {key}"},
            json={"task": "complete", "input": {"prompt": "hello"}, "model": "scripted"},
        )
    assert response.status_code == 202, response.text
    request_id = uuid.UUID(response.json()["id"])
    assert status_of(sessions, request_id).published_at is None  # due for the reconciler
    reconciler.run_once()
    assert finished(sessions, request_id).status is RequestStatus.SUCCEEDED
    with sessions() as session:
        count = session.scalar(select(func.count()).where(LedgerEntry.tenant_id == tenant.id))
    assert count == 1


def test_api_answers_503_with_retry_after_while_postgres_is_down(
    settings: Settings, api_key: str
) -> None:
    cut_off = settings.model_copy(
        update={
            "database_url": f"postgresql+psycopg://postgres@127.0.0.1:{DEAD_PORT}/test",
            "reconciler": False,
        }
    )
    with TestClient(create_app(cut_off), raise_server_exceptions=False) as api:
        headers = {"Authorization": f"Bearer {api_key}"}
        body = {"task": "complete", "input": {"prompt": "hello"}}
        for response in (
            api.post("/v1/requests", headers=headers, json=body),
            api.get(f"/v1/requests/{uuid.uuid4()}", headers=headers),
        ):
            assert response.status_code == 503, response.text
            assert response.headers["Retry-After"].isdigit()
            assert "database is unavailable" in response.json()["detail"]


RETRYING = CONFIG.model_copy(
    update={
        "models": {
            "s": CONFIG.models["s"].model_copy(update={"max_attempts": 3, "retry_backoff_s": 0.05})
        }
    }
)


def test_failed_attempts_are_retried_with_backoff_up_to_max_attempts(
    make_runtime: Callable[..., WorkerRuntime],
    sessions: sessionmaker[Session],
    tenant_id: uuid.UUID,
) -> None:
    engine = ScriptedEngine(
        rules=[Rule(match="FLAKY", fail="transient", times=2), Rule(match="BROKEN", fail="bad")]
    )
    resent: list[RunMessage] = []

    def publish_runs(messages: list[RunMessage]) -> None:  # the broker, in process
        resent.extend(messages)
        for sent in messages:
            runtime.submit(sent)

    runtime = make_runtime(
        engine, config=RETRYING, model="s", worker_name="retrying", publish_runs=publish_runs
    )
    flaky, broken = add(
        sessions, row(tenant_id, "FLAKY", model="s"), row(tenant_id, "BROKEN", model="s")
    )
    runtime.submit(message(sessions, flaky))  # alone: each try is one match
    recovered = finished(sessions, flaky)
    runtime.submit(message(sessions, broken))
    gave_up = finished(sessions, broken)
    assert (recovered.status, recovered.attempts) == (RequestStatus.SUCCEEDED, 3)
    assert executions(sessions, flaky) == [Outcome.FAILED, Outcome.FAILED, Outcome.SUCCEEDED]
    assert (gave_up.status, gave_up.attempts, gave_up.error) == (
        RequestStatus.FAILED,
        3,
        "EngineError: bad",
    )
    assert executions(sessions, broken) == [Outcome.FAILED] * 3
    assert sorted(m.attempt for m in resent) == [2, 2, 3, 3]
    with sessions() as session:
        costs = session.scalars(
            select(LedgerEntry.gpu_seconds).where(LedgerEntry.request_id == broken)
        ).all()
    assert all(cost > 0 for cost in costs)  # failed calls are charged: they are waste
