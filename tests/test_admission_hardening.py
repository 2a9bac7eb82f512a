"""No line stalls admission, and no job stalls another's.

A line that trips Python or Postgres (nested a thousand deep, an id too wide or holding NUL,
``NaN``, NUL in a key, a schema nested a hundred deep) is refused with its reason and the rest
of its job is admitted, on the inline path and in the background. A job whose admission keeps
failing for a reason that is not a line's fails with that reason after a bounded number of
tries, while other jobs go on. Everything names the ``parked`` model (no worker), so nothing
admitted runs: the tests watch admission alone.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from core.enums import JobStatus, TaskKind
from core.settings import Settings
from storage.tables import Job, JobSource
from tests.conftest import new_tenant, service_env, start_api, stop, wait_for
from tests.test_jobs import ndjson, upload

INLINE = 40  # uploads up to this many lines are checked before the answer
MAX_ATTEMPTS = 3
SPEC: dict[str, object] = {
    "task": "extract",
    "model": "parked",
    "params": {"max_tokens": 8},
    "input": {"schema": {"type": "object", "properties": {"colour": {"type": "string"}}}},
}


def nested_schema(levels: int) -> dict[str, object]:
    schema: dict[str, object] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


NAN_SCHEMA = b'{"type": "object", "properties": {"a": {"type": "number", "maximum": NaN}}}'
SHAPES: dict[str, tuple[bytes, str]] = {
    "nested 1,000 deep": (
        b'{"id": "deep", "text": ' + b"[" * 1000 + b"]" * 1000 + b"}",
        "nested more than 64 levels deep",
    ),
    "300-character id": (
        json.dumps({"id": "x" * 300, "text": "red shirt"}).encode(),
        "id is 300 characters; the limit is 200",
    ),
    "id with NUL": (
        json.dumps({"id": "a\u0000b", "text": "red shirt"}).encode(),
        "id contains a NUL character",
    ),
    "NaN in the schema": (
        b'{"id": "nan", "input": {"text": "red shirt", "schema": ' + NAN_SCHEMA + b"}}",
        "NaN and Infinity are not JSON numbers",
    ),
    "NUL in an unknown key": (
        json.dumps({"id": "nulkey", "input": {"text": "red shirt", "odd\u0000key": 1}}).encode(),
        "a key contains a NUL character",
    ),
    "schema nested 100 deep": (
        json.dumps(
            {"id": "schema", "input": {"text": "red shirt", "schema": nested_schema(100)}}
        ).encode(),
        "nested more than 64 levels deep",
    ),
}


@pytest.fixture(scope="module")
def admission_url(settings: Settings, log_dir: Path) -> Iterator[str]:
    """An ``inferq api`` of its own, with small chunks, so a 100-line job is admitted in the
    background in several chunks."""
    env = service_env(settings)
    env.update(
        INFERQ_INLINE_JOB_LINES=str(INLINE),
        INFERQ_ADMISSION_FIRST_CHUNK="5",
        INFERQ_ADMISSION_CHUNK_LINES="20",
        INFERQ_ADMISSION_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
        INFERQ_RECONCILER="false",
    )
    process, url = start_api(env, log_dir, "api-admission")
    yield url
    stop(process)


def tenant_client(url: str, sessions: sessionmaker[Session]) -> httpx.Client:
    key = new_tenant(sessions, "admit").key
    return client_for(url, key)


def client_for(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


@pytest.fixture
def http(admission_url: str, sessions: sessionmaker[Session]) -> Iterator[httpx.Client]:
    with tenant_client(admission_url, sessions) as client:
        yield client


def good_lines(count: int, *, prefix: str = "item") -> list[bytes]:
    items = [{"id": f"{prefix}-{i}", "text": f"red shirt {i}"} for i in range(count)]
    return [json.dumps(item).encode() for item in items]


def admitted(client: httpx.Client, job_id: str, *, lines: int) -> dict[str, object]:
    """Wait until every line of the job is admitted or refused; its state then."""
    state: dict[str, object] = {}

    def done() -> bool:
        state.update(client.get(f"/v1/jobs/{job_id}").json())
        counted = int(state["total"]) + int(state["invalid"])  # type: ignore[call-overload]
        return state["status"] != "validating" and counted == lines

    wait_for(done, timeout=120, what=f"every line of job {job_id} admitted or refused")
    return state


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("where", [3, 77], ids=["first chunk", "later chunk"])
def test_a_bad_line_is_refused_and_the_rest_admitted(
    http: httpx.Client, shape: str, where: int
) -> None:
    bad, reason = SHAPES[shape]
    lines = good_lines(99)
    lines.insert(where - 1, bad)
    response = upload(http, SPEC, lines)
    assert response.status_code == 202, response.text
    state = admitted(http, response.json()["id"], lines=100)
    assert (state["status"], state["total"], state["invalid"]) == ("in_progress", 99, 1)
    [error] = ndjson(http.get(f"/v1/jobs/{state['id']}/errors"))
    assert error["line"] == where and reason in str(error["error"]), error


def test_inline_upload_with_bad_ids_is_answered_with_per_line_errors(http: httpx.Client) -> None:
    lines = good_lines(28)
    lines.insert(4, SHAPES["300-character id"][0])
    lines.insert(20, SHAPES["id with NUL"][0])
    response = upload(http, SPEC, lines)
    assert response.status_code == 202, response.text
    assert (response.json()["total"], response.json()["invalid"]) == (28, 2)
    errors = ndjson(http.get(f"/v1/jobs/{response.json()['id']}/errors"))
    assert [(e["line"], e["id"]) for e in errors] == [(5, None), (21, None)]
    assert "limit is 200" in str(errors[0]["error"]) and "NUL" in str(errors[1]["error"])


def test_batch_with_every_bad_shape_runs_the_good_lines(http: httpx.Client) -> None:
    def line(custom_id: str, **body: object) -> bytes:
        body = {"model": "parked", "max_tokens": 8, **body}
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
        request = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions"}
        return json.dumps({**request, "body": body}).encode()

    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": nested_schema(100)}}
    bad = [
        b'{"custom_id": "deep", "body": ' + b"[" * 1000 + b"]" * 1000 + b"}",
        line("x" * 300),
        line("a\u0000b"),
        line("nan", temperature=float("nan")),
        line("nulkey", **{"odd\u0000key": 1}),
        line("schema", response_format=schema),
    ]
    data = b"\n".join([line(f"ok-{i}") for i in range(6)] + bad)
    file = http.post("/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", data)})
    assert file.status_code == 200, file.text
    spec = {
        "input_file_id": file.json()["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    batch = http.post("/v1/batches", json=spec)
    assert batch.status_code == 200, batch.text
    counts = batch.json()["request_counts"]
    assert (batch.json()["status"], counts["total"], counts["failed"]) == ("in_progress", 12, 6)


def test_another_tenants_job_is_admitted_after_a_poisoned_one(
    admission_url: str, sessions: sessionmaker[Session]
) -> None:
    with (
        tenant_client(admission_url, sessions) as first,
        tenant_client(admission_url, sessions) as second,
    ):
        poisoned = good_lines(99, prefix="p")
        for at, shape in zip([10, 30, 60, 90], SHAPES, strict=False):
            poisoned[at] = SHAPES[shape][0]
        one = upload(first, SPEC, poisoned)
        other = upload(second, SPEC, good_lines(100, prefix="q"))
        assert one.status_code == other.status_code == 202, (one.text, other.text)
        state = admitted(second, other.json()["id"], lines=100)
        assert (state["total"], state["invalid"]) == (100, 0)
        state = admitted(first, one.json()["id"], lines=99)
        assert (state["total"], state["invalid"]) == (95, 4)


@pytest.fixture
def own(
    admission_url: str, sessions: sessionmaker[Session]
) -> Iterator[tuple[uuid.UUID, httpx.Client]]:
    """A fresh tenant's id and client, for tests that write its rows themselves."""
    tenant = new_tenant(sessions, "admit")
    tenant_id, key = tenant.id, tenant.key
    with client_for(admission_url, key) as client:
        yield tenant_id, client


def test_a_job_admission_cannot_process_fails_with_the_reason_after_bounded_tries(
    own: tuple[uuid.UUID, httpx.Client], sessions: sessionmaker[Session]
) -> None:
    """A row admission cannot read (the job's shared input is not an object, as no upload
    could store it) makes every try fail the same way, whatever its lines hold."""
    tenant_id, http = own
    with sessions.begin() as session:
        job = Job(
            tenant_id=tenant_id,
            task=TaskKind.EXTRACT,
            model="parked",
            status=JobStatus.VALIDATING,
            shared={"input": "not an object", "params": {"max_tokens": 8}},
        )
        session.add(job)
        session.flush()
        content = b"\n".join(good_lines(60, prefix="r"))
        session.add(JobSource(job_id=job.id, content=content, format="native", strict=False))
        job_id = job.id
    other = upload(http, SPEC, good_lines(100, prefix="s"))  # admitted meanwhile
    assert admitted(http, other.json()["id"], lines=100)["total"] == 100

    def failed() -> bool:
        return bool(http.get(f"/v1/jobs/{job_id}").json()["status"] == "failed")

    wait_for(failed, timeout=120, what="the unreadable job to fail")
    [error] = ndjson(http.get(f"/v1/jobs/{job_id}/errors"))
    assert error["line"] == 1, error
    said = str(error["error"])
    assert f"admission failed {MAX_ATTEMPTS} times in a row" in said, said
    assert "ValidationError" in said and "input" in said, said
    with sessions() as session:
        assert session.get(JobSource, job_id) is None
