"""Backpressure on real Postgres and Redis: 429 with Retry-After, and nothing written."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from api.admission import Admitter
from api.app import create_app
from api.jobs import JobSpec, create_job
from core.enums import JobStatus, Priority, RequestStatus, TaskKind
from core.settings import Settings
from storage.tables import Job, Request
from submission.services import build_services
from tasks.templates import SamplingIn
from tests.conftest import NewTenant, Process, new_tenant, wait_for


def queued_on(sessions: sessionmaker[Session], model: str, priority: Priority | None = None) -> int:
    """Requests waiting for ``model`` (of ``priority`` only, when given)."""
    with sessions() as session:
        query = select(func.count()).where(
            Request.model == model, Request.status == RequestStatus.QUEUED
        )
        if priority is not None:
            query = query.where(Request.priority == priority)
        return int(session.scalar(query) or 0)


def tenant_rows(sessions: sessionmaker[Session], tenant_id: uuid.UUID) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).where(Request.tenant_id == tenant_id)) or 0)


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
    settings: Settings, sessions: sessionmaker[Session], tenant: NewTenant
) -> None:
    tenant_id, headers = tenant.id, tenant.headers
    # An interactive request waits only behind interactive ones: other tests' bulk work on
    # "parked" does not count toward its limit.
    limit = queued_on(sessions, "parked", Priority.INTERACTIVE) + 3
    for client in api(settings, max_queued_per_model=limit):
        for _ in range(3):
            assert client.post("/v1/requests", headers=headers, json=parked()).status_code == 202
        assert_refused(client.post("/v1/requests", headers=headers, json=parked()), "waiting")
    assert tenant_rows(sessions, tenant_id) == 3


def test_a_tenant_with_too_much_in_flight_is_refused(
    settings: Settings, sessions: sessionmaker[Session], tenant: NewTenant
) -> None:
    tenant_id, headers = tenant.id, tenant.headers
    for client in api(settings, max_inflight_per_tenant=2):
        for _ in range(2):
            assert client.post("/v1/requests", headers=headers, json=parked()).status_code == 202
        assert_refused(client.post("/v1/requests", headers=headers, json=parked()), "in flight")
        items = [{"id": str(i), "prompt": "x"} for i in range(3)]
        job = {"task": "complete", "model": "parked", "items": items}
        assert_refused(client.post("/v1/jobs", headers=headers, json=job), "in flight")
    assert tenant_rows(sessions, tenant_id) == 2


def test_a_tenant_over_its_tokens_per_minute_is_refused(
    settings: Settings, sessions: sessionmaker[Session], tenant: NewTenant
) -> None:
    tenant_id, headers = tenant.id, tenant.headers

    def brief(prompt: str) -> dict[str, object]:  # prompt + 4 output tokens reserved
        return {**parked(prompt, "scripted"), "params": {"max_tokens": 4}}

    for client in api(settings, tenant_tokens_per_minute=60):
        small = client.post("/v1/requests", headers=headers, json=brief("a few words"))
        assert small.status_code == 202, small.text
        huge = client.post("/v1/requests", headers=headers, json=brief("word " * 80))
        assert_refused(huge, "tokens used this minute")
        assert int(huge.headers["Retry-After"]) <= 60
        # The refused request cost nothing: a small one still fits in the window.
        again = client.post("/v1/requests", headers=headers, json=brief("a few words"))
        assert again.status_code == 202, again.text
    assert tenant_rows(sessions, tenant_id) == 2


def parked_job(lines: int, *, prefix: str = "j") -> dict[str, object]:
    """A bulk job on the parked model: its requests wait, at batch priority."""
    items = [{"id": f"{prefix}{i}", "prompt": f"item {i}"} for i in range(lines)]
    return {"task": "complete", "model": "parked", "params": {"max_tokens": 4}, "items": items}


def interactive_on(sessions: sessionmaker[Session], model: str) -> int:
    with sessions() as session:
        query = select(func.count()).where(
            Request.model == model,
            Request.status == RequestStatus.QUEUED,
            Request.priority == Priority.INTERACTIVE,
        )
        return int(session.scalar(query) or 0)


def test_another_tenants_bulk_work_does_not_refuse_interactive_requests(
    settings: Settings, sessions: sessionmaker[Session], tenant: NewTenant
) -> None:
    bulk, headers = tenant.headers, new_tenant(sessions).headers
    for client in api(settings):
        job = client.post("/v1/jobs", headers=bulk, json=parked_job(20))
        assert job.status_code == 202, job.text
    # Room for two more interactive requests, far less than the bulk work already waiting.
    limit = interactive_on(sessions, "parked") + 2
    assert queued_on(sessions, "parked") >= limit + 18
    for client in api(settings, max_queued_per_model=limit):
        accepted = client.post("/v1/requests", headers=headers, json=parked())
        assert accepted.status_code == 202, accepted.text
        # Bulk work still counts everything waiting: more of it is refused.
        more = client.post("/v1/jobs", headers=headers, json=parked_job(2, prefix="k"))
        assert_refused(more, "requests waiting")


def test_a_batch_over_the_tenants_limits_is_refused(
    settings: Settings, sessions: sessionmaker[Session], tenant: NewTenant
) -> None:
    tenant_id, headers = tenant.id, tenant.headers
    request = {"method": "POST", "url": "/v1/chat/completions"}
    body = {"model": "parked", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    lines = [json.dumps({**request, "custom_id": f"c{i}", "body": body}) for i in range(3)]
    for client in api(settings, max_inflight_per_tenant=2):
        files = {"file": ("in.jsonl", "\n".join(lines).encode())}
        upload = client.post("/v1/files", headers=headers, data={"purpose": "batch"}, files=files)
        assert upload.status_code == 200, upload.text
        spec = {
            "input_file_id": upload.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        refused = client.post("/v1/batches", headers=headers, json=spec)
        assert refused.status_code == 429, refused.text
        assert refused.headers["Retry-After"].isdigit()
        assert "in flight" in refused.json()["error"]["message"]
    assert tenant_rows(sessions, tenant_id) == 0


def test_background_admission_waits_for_the_tenants_room(
    settings: Settings, sessions: sessionmaker[Session], tenant_id: uuid.UUID
) -> None:
    """A large job is admitted only as far as its tenant's in-flight limit allows; the rest
    waits (the job stays ``validating``) and goes in as earlier work finishes."""
    small = settings.model_copy(
        update={
            "inline_job_lines": 2,
            "admission_first_chunk": 3,
            "admission_chunk_lines": 4,
            "max_inflight_per_tenant": 7,
        }
    )
    services = build_services(small)
    try:
        items = b"".join(b'{"id": "a%d", "prompt": "item %d"}\n' % (i, i) for i in range(12))
        spec = JobSpec(task=TaskKind.COMPLETE, model="parked", params=SamplingIn(max_tokens=4))
        job, _ = create_job(services, tenant_id, spec, items)
        admitter = Admitter(services)
        while admitter.admit_chunk(job.id):  # 3, then 4: the tenant's 7
            pass
        with sessions() as session:
            row = session.get(Job, job.id)
            assert row is not None and (row.status, row.total) == (JobStatus.VALIDATING, 7)
        with sessions.begin() as session:  # what a worker would do: finish them
            done = update(Request).where(Request.job_id == job.id)
            session.execute(done.values(status=RequestStatus.SUCCEEDED))

        def all_in() -> bool:
            admitter.admit_chunk(job.id)
            with sessions() as session:
                row = session.get(Job, job.id)
                return row is not None and row.total == 12

        wait_for(all_in, timeout=60, what="the rest of the job admitted as room came back")
    finally:
        services.dispose()


def test_output_tokens_count_toward_the_tenants_budget(
    settings: Settings, sessions: sessionmaker[Session], tenant: NewTenant
) -> None:
    """A short prompt asking for many tokens is charged the most it may generate:
    ``max_tokens`` x ``n``, not its prompt alone."""
    tenant_id, headers = tenant.id, tenant.headers

    def expand(n: int, max_tokens: int) -> dict[str, object]:
        return {
            "task": "expand",
            "model": "scripted",
            "input": {"query": "red boots", "n": n},
            "params": {"max_tokens": max_tokens, "temperature": 0.7},
        }

    for client in api(settings, tenant_tokens_per_minute=60):
        refused = client.post("/v1/requests", headers=headers, json=expand(8, 10))  # 80 out
        assert_refused(refused, "max_tokens x n reserved")
        ok = client.post("/v1/requests", headers=headers, json=expand(2, 10))  # 20 out
        assert ok.status_code == 202, ok.text
    assert tenant_rows(sessions, tenant_id) == 1


def test_unused_output_tokens_are_given_back_when_the_request_finishes(
    settings: Settings, sessions: sessionmaker[Session], workers: dict[str, Process]
) -> None:
    """Admission reserves the prompt and ``max_tokens``; the scripted engine answers in a few
    tokens and its worker gives the rest back, so a request that did not fit beside the first
    fits once the first has finished."""
    del workers  # the scripted worker runs the first request
    # A minute turning between the two requests voids an attempt: the second would fit.
    for _ in range(3):
        if settles_in_one_minute(settings, sessions):
            return
    pytest.fail("the minute turned between the two requests three times")


def settles_in_one_minute(settings: Settings, sessions: sessionmaker[Session]) -> bool | None:
    """True once the refused request fits after the first finished; None if the minute
    turned before the check could be made."""
    body = {
        "task": "complete",
        "model": "scripted",
        "input": {"prompt": "hello there"},
        "params": {"max_tokens": 150},
    }
    headers = new_tenant(sessions, "budget").headers
    app = create_app(
        settings.model_copy(update={"reconciler": False, "tenant_tokens_per_minute": 200})
    )
    with TestClient(app) as client:
        window = int(time.time()) // 60
        first = client.post("/v1/requests", headers=headers, json=body)
        assert first.status_code == 202, first.text
        second = client.post("/v1/requests", headers=headers, json=body)
        if int(time.time()) // 60 != window:
            return None
        assert_refused(second, "tokens used this minute")
        path = f"/v1/requests/{first.json()['id']}?wait=10"

        def finished() -> bool:
            return bool(client.get(path, headers=headers).json()["status"] == "succeeded")

        wait_for(finished, timeout=120, what="the first request to finish")

        def fits() -> bool:
            again = client.post("/v1/requests", headers=headers, json=body)
            return again.status_code == 202

        wait_for(fits, timeout=60, what="the unused output tokens to be given back")
    return True
