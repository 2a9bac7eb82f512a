"""Bulk jobs through the API on real services: upload with bad lines, results in input order,
errors by line, cancel mid-job, strict refusal."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
from jsonschema import Draft202012Validator
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from storage.tables import Job, LedgerEntry, Request
from tests.conftest import wait_for

DATA = Path(__file__).parents[1] / "inferq" / "data"
SCHEMA = json.loads((DATA / "product_schema.json").read_text())
PRODUCTS = [json.loads(line) for line in (DATA / "products.jsonl").read_text().splitlines()]


def upload(client: httpx.Client, spec: dict[str, object], lines: list[bytes]) -> httpx.Response:
    files = {"file": ("items.jsonl", b"\n".join(lines), "application/x-ndjson")}
    return client.post("/v1/jobs", data={"job": json.dumps(spec)}, files=files)


def finished(client: httpx.Client, job_id: str) -> dict[str, object]:
    state: dict[str, object] = {}

    def done() -> bool:
        state.update(client.get(f"/v1/jobs/{job_id}").json())
        return state["status"] in ("completed", "cancelled")

    wait_for(done, timeout=300, what=f"job {job_id} to finish")
    return state


def ndjson(response: httpx.Response) -> list[dict[str, object]]:
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines()]


def test_extraction_job_of_500_items_with_bad_lines(client: httpx.Client) -> None:
    items = [{"id": f"item-{i}", "text": PRODUCTS[i % len(PRODUCTS)]["text"]} for i in range(500)]
    lines = [json.dumps(item).encode() for item in items]
    bad = {
        3: b'{"id": "broken", "text": ',  # malformed JSON
        10: json.dumps({"id": "blank", "text": "   "}).encode(),  # empty input
        20: json.dumps({"id": "item-0", "text": "again"}).encode(),  # duplicate id
        30: b"[1, 2, 3]",  # not an object
        40: json.dumps({"id": "huge", "text": "x" * 200_000}).encode(),  # over the line limit
    }
    for position, line in sorted(bad.items()):
        lines.insert(position, line)
    response = upload(client, {"task": "extract", "input": {"schema": SCHEMA}}, lines)
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["total"], job["invalid"]) == (500, 5)

    state = finished(client, job["id"])
    assert state["status"] == "completed"
    assert state["counts"]["succeeded"] == 500  # type: ignore[index]

    results = ndjson(client.get(f"/v1/jobs/{job['id']}/results"))
    assert [r["id"] for r in results] == [item["id"] for item in items]  # input order
    validator = Draft202012Validator(SCHEMA)
    assert all(
        r["status"] == "succeeded" and not list(validator.iter_errors(r["output"])) for r in results
    )

    errors = ndjson(client.get(f"/v1/jobs/{job['id']}/errors"))
    assert [e["line"] for e in errors] == [4, 11, 21, 31, 41]  # 1-based, after insertion
    messages = " | ".join(str(e["error"]) for e in errors)
    for reason in (
        "not valid JSON",
        "must not be empty",
        "duplicate id 'item-0'",
        "JSON object",
        "limit",
    ):
        assert reason in messages


def test_cancel_mid_job(client: httpx.Client, sessions: sessionmaker[Session]) -> None:
    lines = [json.dumps({"id": str(i), "prompt": f"SLOW item {i}"}).encode() for i in range(300)]
    response = upload(client, {"task": "complete", "model": "scripted"}, lines)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]

    wait_for(
        lambda: client.get(f"/v1/jobs/{job_id}").json()["counts"]["succeeded"] > 0,
        timeout=120,
        what="the first results",
    )
    cancelled = client.post(f"/v1/jobs/{job_id}/cancel").json()
    assert cancelled["status"] in ("cancelling", "cancelled")
    state = finished(client, job_id)
    counts = state["counts"]
    assert isinstance(counts, dict)
    assert counts["succeeded"] + counts["cancelled"] == 300 and counts["cancelled"] > 0
    with sessions() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None and job.cancelled_at is not None
        rows = session.scalars(select(Request).where(Request.job_id == job.id)).all()
        ran = dict(
            session.execute(
                select(LedgerEntry.request_id, LedgerEntry.outcome).where(
                    LedgerEntry.request_id.in_([r.id for r in rows])
                )
            ).all()
        )
    # Nothing started after the cancel. What was running then ran to its batch's end (a
    # static engine) and is charged as cancelled, waste; nothing cancelled ran otherwise.
    cancelled_at = job.cancelled_at
    for r in rows:
        if r.started_at is not None and r.status in ("succeeded", "cancelled"):
            assert r.started_at <= cancelled_at, (r.status, r.started_at, cancelled_at)
        if r.status == "succeeded":
            assert r.started_at is not None
        if r.status == "cancelled" and r.id in ran:
            assert r.started_at is not None and ran[r.id] == "cancelled", (r.id, ran[r.id])


def test_strict_job_with_a_bad_line_writes_nothing(
    client: httpx.Client, sessions: sessionmaker[Session]
) -> None:
    lines = [b'{"id": "a", "prompt": "fine"}', b"{nope", b'{"id": "b", "prompt": "fine"}']
    response = upload(client, {"task": "complete", "model": "parked", "strict": True}, lines)
    assert response.status_code == 422
    assert "line 2: not valid JSON" in response.json()["detail"]
    assert client.get("/v1/jobs").json()["data"] == []


def test_invalid_schema_refuses_the_job(client: httpx.Client) -> None:
    items = [{"id": "a", "text": "red shoe"}]
    body = {"task": "extract", "input": {"schema": {"type": "nonsense"}}, "items": items}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    assert "not a valid JSON Schema" in response.json()["detail"]


def test_json_list_form_and_tenant_scoping(client: httpx.Client, api_url: str) -> None:
    body = {
        "task": "classify",
        "input": {"labels": ["a", "b"]},
        "model": "scripted",
        "items": [{"id": "x", "text": "one"}, {"id": "y", "input": {"text": "two"}}],
    }
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert finished(client, job_id)["status"] == "completed"
    assert [r["output"] for r in ndjson(client.get(f"/v1/jobs/{job_id}/results"))] == ["a", "a"]
    stranger = httpx.get(f"{api_url}/v1/jobs/{job_id}", headers={"Authorization": "Bearer nope"})
    assert stranger.status_code == 401


def test_expand_job_without_temperature_keeps_the_sampling_default(
    client: httpx.Client, sessions: sessionmaker[Session]
) -> None:
    """Params a job does not set stay unset: an expand job samples its variants. (The JSON
    form once stored every default, an explicit temperature 0, and refused every line.)"""
    body = {"task": "expand", "model": "parked", "items": [{"id": "a", "query": "red shoes"}]}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job_id = uuid.UUID(response.json()["id"])
    with sessions() as session:
        [params] = session.scalars(select(Request.params).where(Request.job_id == job_id))
        job = session.get(Job, job_id)
        assert job is not None and job.shared == {"input": {}, "params": {}}
    assert params == {}  # the reconciler renders it again from this
    client.post(f"/v1/jobs/{job_id}/cancel")  # parked: it would wait forever
