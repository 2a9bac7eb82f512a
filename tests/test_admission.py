"""Large uploads admitted in the background: answered ``validating`` at once, checked and
published a chunk at a time, resumable, paused while a job has enough work waiting."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from api.admission import Admitter
from api.jobs import JobSpec, create_job
from api.openai_batches import create_batch, get_batch
from api.openai_schemas import BatchCreate, BatchObject
from core.enums import JobStatus, RequestStatus, TaskKind
from core.settings import Settings
from storage import jobs as job_store
from storage.migrate import scratch_database
from storage.openai_files import Batch, StoredFile, new_file_id
from storage.tables import Job, JobError, JobSource, Request
from storage.webhooks import WebhookDelivery, register_endpoint
from submission.services import Services, build_services
from tests.conftest import PG_URL, new_tenant
from tests.test_jobs import finished, ndjson, upload

SCHEMA = {
    "type": "object",
    "properties": {"colour": {"type": "string", "maxLength": 12}},
    "required": ["colour"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def services(settings: Settings) -> Iterator[Services]:
    """In-process services with tiny chunks, for exact assertions on admission, on a database
    of their own: every ``inferq api`` of the session admits any job it sees, in its own
    chunks, and would take a job over between two of a test's."""
    with scratch_database(PG_URL) as database_url:
        small = settings.model_copy(
            update={
                "database_url": database_url,
                "inline_job_lines": 10,
                "admission_first_chunk": 5,
                "admission_chunk_lines": 20,
                "admission_max_open": 30,
            }
        )
        built = build_services(small)
        yield built
        built.dispose()


@pytest.fixture
def tenant_id(services: Services) -> uuid.UUID:
    """A fresh tenant in the database of ``services``."""
    return new_tenant(services.sessions).id


def jsonl(items: list[object]) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


def drain(admitter: Admitter, job_id: uuid.UUID) -> int:
    """Admit chunks until the admitter has nothing more to do for now; count them."""
    chunks = 0
    while admitter.admit_chunk(job_id):
        chunks += 1
        assert chunks < 100, "admission does not converge"
    return chunks


def drain_work(sessions: sessionmaker[Session], job_id: uuid.UUID) -> None:
    """What a worker would do for the requests waiting: finish them."""
    with sessions.begin() as session:
        done = update(Request).where(Request.job_id == job_id)
        session.execute(done.values(status=RequestStatus.SUCCEEDED))


def job_state(sessions: sessionmaker[Session], job_id: uuid.UUID) -> tuple[Job, int, int]:
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        lines = select(func.count(Request.id), func.count(func.distinct(Request.line)))
        count, distinct = session.execute(lines.where(Request.job_id == job_id)).one()
        session.expunge(job)
        return job, count, distinct


def test_large_upload_is_answered_validating_then_runs(client: httpx.Client) -> None:
    items: list[bytes] = [
        json.dumps({"id": f"item-{i}", "text": f"red cotton shirt number {i}"}).encode()
        for i in range(2_600)
    ]
    items.insert(1_500, json.dumps({"id": "item-3", "text": "a later duplicate"}).encode())
    items.insert(2_200, b'{"id": "broken", ')
    spec = {"task": "extract", "model": "scripted", "input": {"schema": SCHEMA}}
    response = upload(client, spec, items)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "validating"

    state = finished(client, response.json()["id"])
    assert state["status"] == "completed"
    assert (state["total"], state["invalid"]) == (2_600, 2)
    assert state["counts"]["succeeded"] == 2_600  # type: ignore[index]
    results = ndjson(client.get(f"/v1/jobs/{state['id']}/results"))
    assert [r["id"] for r in results] == [f"item-{i}" for i in range(2_600)]
    errors = ndjson(client.get(f"/v1/jobs/{state['id']}/errors"))
    assert [e["line"] for e in errors] == [1_501, 2_201]
    assert "duplicate id 'item-3' (first on line 4)" in str(errors[0]["error"])


def test_admission_pauses_while_work_waits_and_resumes_after_a_restart(
    services: Services, tenant_id: uuid.UUID
) -> None:
    sessions = services.sessions
    items: list[object] = [{"id": f"p{i}", "prompt": f"item {i}"} for i in range(100)]
    items[60] = {"id": "p3", "prompt": "duplicate of line 4, admitted in an earlier chunk"}
    spec = JobSpec(task=TaskKind.COMPLETE, model="parked")  # no worker: requests stay queued
    job, _ = create_job(services, tenant_id, spec, jsonl(items))
    assert job.status is JobStatus.VALIDATING

    admitter, totals = Admitter(services), []
    while admitter.admit_chunk(job.id):
        totals.append(job_state(sessions, job.id)[1])
    # Chunks grow from the first, each as long as all before it, up to 20: then 40 waiting
    # are past the 30 a job may have open.
    assert totals == [5, 10, 20, 40]
    admitted, count, distinct = job_state(sessions, job.id)
    assert (admitted.status, admitted.total, count, distinct) == (JobStatus.VALIDATING, 40, 40, 40)

    drain_work(sessions, job.id)  # the waiting work runs; a fresh process takes over
    assert drain(Admitter(services), job.id) == 2  # 20 and 20 more (one a duplicate): 39 >= 30
    assert job_state(sessions, job.id)[0].total == 79
    drain_work(sessions, job.id)
    assert drain(Admitter(services), job.id) == 1  # the last 20 lines
    done, count, distinct = job_state(sessions, job.id)
    assert (done.status, done.total, done.invalid) == (JobStatus.IN_PROGRESS, 99, 1)
    assert count == distinct == 99  # no line inserted twice across the restart
    with sessions() as session:
        assert session.get(JobSource, job.id) is None
        [error] = session.scalars(select(JobError).where(JobError.job_id == job.id))
        assert (error.line, error.item_id) == (61, "p3")
        assert "first on line 4" in error.message


def test_strict_job_with_a_bad_line_fails_whole(services: Services, tenant_id: uuid.UUID) -> None:
    sessions = services.sessions
    items: list[object] = [{"id": f"s{i}", "prompt": f"item {i}"} for i in range(40)]
    items[33] = {"id": "s33"}  # no prompt
    spec = JobSpec(task=TaskKind.COMPLETE, model="parked", strict=True)
    job, _ = create_job(services, tenant_id, spec, jsonl(items))
    assert drain(Admitter(services), job.id) == 1
    failed, count, _ = job_state(sessions, job.id)
    assert (failed.status, failed.total, failed.invalid, count) == (JobStatus.FAILED, 0, 1, 0)
    assert failed.finished_at is not None


def test_cancel_during_admission_admits_nothing_more(
    services: Services, tenant_id: uuid.UUID
) -> None:
    sessions = services.sessions
    items: list[object] = [{"id": f"c{i}", "prompt": f"item {i}"} for i in range(50)]
    job, _ = create_job(
        services, tenant_id, JobSpec(task=TaskKind.COMPLETE, model="parked"), jsonl(items)
    )
    admitter = Admitter(services)
    assert admitter.admit_chunk(job.id)  # the first 5
    with sessions.begin() as session:
        row = session.get(Job, job.id)
        assert row is not None
        assert job_store.cancel(session, row, row.created_at) == 5
    assert drain(admitter, job.id) == 1  # sees the cancel, stops
    cancelled, count, _ = job_state(sessions, job.id)
    assert (cancelled.total, count) == (5, 5)
    with sessions() as session:
        assert session.get(JobSource, job.id) is None
        open_ = select(func.count()).where(
            Request.job_id == job.id, Request.status == RequestStatus.QUEUED
        )
        assert session.scalar(open_) == 0


def test_openai_batch_of_only_bad_lines_fails_after_validating(
    services: Services, tenant_id: uuid.UUID
) -> None:
    lines = [
        {"custom_id": f"b{i}", "method": "GET", "url": "/v1/chat/completions"} for i in range(12)
    ]
    batch = validating_batch(services, tenant_id, lines, "/v1/chat/completions")
    assert drain(Admitter(services), _job_of(services, batch.id)) == 3  # 5, 5 and 2 lines
    failed = get_batch(services, tenant_id, batch.id)
    assert failed.status == "failed"
    assert failed.request_counts.failed == 12
    assert failed.errors is not None and "method 'GET'" in str(failed.errors.data[0].message)


def validating_batch(
    services: Services, tenant_id: uuid.UUID, lines: list[dict[str, object]], endpoint: str
) -> BatchObject:
    """A batch of ``lines`` for ``endpoint``, from a stored file, answered ``validating``."""
    file_id, data = new_file_id(), jsonl(lines)  # type: ignore[arg-type]
    with services.sessions.begin() as session:
        session.add(
            StoredFile(
                id=file_id,
                tenant_id=tenant_id,
                filename="in.jsonl",
                purpose="batch",
                size=len(data),
                content=data,
            )
        )
    body = BatchCreate(input_file_id=file_id, endpoint=endpoint, completion_window="24h")
    batch = create_batch(services, tenant_id, body)
    assert batch.status == "validating"
    return batch


def _job_of(services: Services, batch_id: str) -> uuid.UUID:
    with services.sessions() as session:
        job_id = session.scalar(select(Batch.job_id).where(Batch.id == batch_id))
        assert job_id is not None
        return job_id


def test_large_batch_is_checked_for_its_endpoint_and_a_failed_one_is_announced(
    services: Services, tenant_id: uuid.UUID
) -> None:
    with services.sessions.begin() as session:
        register_endpoint(session, tenant_id, "https://hooks.example.com/batches")

    def validating(lines: list[dict[str, object]]) -> str:
        batch = validating_batch(services, tenant_id, lines, "/v1/embeddings")
        drain(Admitter(services), _job_of(services, batch.id))
        return batch.id

    embed = {"model": "scripted", "input": "red scarf"}
    good = validating(
        [
            {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings", "body": embed}
            for i in range(12)
        ]
    )
    with services.sessions() as session:
        query = select(Request.task).where(Request.job_id == _job_of(services, good))
        assert list(session.scalars(query)) == [TaskKind.EMBED] * 12

    chat = {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": {}}
    bad = validating([{**chat, "custom_id": f"c{i}"} for i in range(12)])
    assert get_batch(services, tenant_id, bad).status == "failed"
    with services.sessions() as session:
        query = select(WebhookDelivery).where(WebhookDelivery.tenant_id == tenant_id)
        events = [(d.event_type, d.payload) for d in session.scalars(query)]
    assert events == [("batch.failed", {"id": bad})]
