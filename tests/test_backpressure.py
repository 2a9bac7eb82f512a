"""Backpressure on real Postgres and Redis: 429 with Retry-After, and nothing written."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from inferq.enums import RequestStatus
from inferq.settings import Settings
from storage.models import Request
from storage.tenants import create_tenant


def queued_on(sessions: sessionmaker[Session], model: str) -> int:
    with sessions() as session:
        query = select(func.count()).where(
            Request.model == model, Request.status == RequestStatus.QUEUED
        )
        return int(session.scalar(query) or 0)


def tenant_rows(sessions: sessionmaker[Session], tenant_id: uuid.UUID) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).where(Request.tenant_id == tenant_id)) or 0)


@pytest.fixture
def tenant(sessions: sessionmaker[Session]) -> tuple[uuid.UUID, dict[str, str]]:
    with sessions.begin() as session:
        row, key = create_tenant(session, f"busy-{uuid.uuid4().hex[:8]}")
        return row.id, {"Authorization": f"Bearer {key}"}


def api(settings: Settings, **limits: int) -> Iterator[TestClient]:
    app = create_app(settings.model_copy(update={"reconciler": False, **limits}))
    with TestClient(app) as client:
        yield client


def parked(prompt: str = "hello", model: str = "parked") -> dict[str, object]:
    """A request for the model no worker serves: it stays queued."""
    return {"task": "complete", "input": {"prompt": prompt}, "model": model}


def assert_refused(response: object, reason: str) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["Retry-After"].isdigit()
    assert reason in response.json()["detail"]


def test_a_full_model_queue_refuses_more(
    settings: Settings, sessions: sessionmaker[Session], tenant: tuple[uuid.UUID, dict[str, str]]
) -> None:
    tenant_id, headers = tenant
    limit = queued_on(sessions, "parked") + 3
    for client in api(settings, max_queued_per_model=limit):
        for _ in range(3):
            assert client.post("/v1/requests", headers=headers, json=parked()).status_code == 202
        assert_refused(client.post("/v1/requests", headers=headers, json=parked()), "waiting")
    assert tenant_rows(sessions, tenant_id) == 3


def test_a_tenant_with_too_much_in_flight_is_refused(
    settings: Settings, sessions: sessionmaker[Session], tenant: tuple[uuid.UUID, dict[str, str]]
) -> None:
    tenant_id, headers = tenant
    for client in api(settings, max_inflight_per_tenant=2):
        for _ in range(2):
            assert client.post("/v1/requests", headers=headers, json=parked()).status_code == 202
        assert_refused(client.post("/v1/requests", headers=headers, json=parked()), "in flight")
        items = [{"id": str(i), "prompt": "x"} for i in range(3)]
        job = {"task": "complete", "model": "parked", "items": items}
        assert_refused(client.post("/v1/jobs", headers=headers, json=job), "in flight")
    assert tenant_rows(sessions, tenant_id) == 2


def test_a_tenant_over_its_tokens_per_minute_is_refused(
    settings: Settings, sessions: sessionmaker[Session], tenant: tuple[uuid.UUID, dict[str, str]]
) -> None:
    tenant_id, headers = tenant
    for client in api(settings, tenant_tokens_per_minute=60):
        small = client.post("/v1/requests", headers=headers, json=parked("a few words", "scripted"))
        assert small.status_code == 202, small.text
        huge = client.post("/v1/requests", headers=headers, json=parked("word " * 80, "scripted"))
        assert_refused(huge, "prompt tokens")
        assert int(huge.headers["Retry-After"]) <= 60
        # The refused request cost nothing: a small one still fits in the window.
        again = client.post("/v1/requests", headers=headers, json=parked("a few words", "scripted"))
        assert again.status_code == 202, again.text
    assert tenant_rows(sessions, tenant_id) == 2
