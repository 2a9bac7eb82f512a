"""Service mode end to end: `inferq api` and `inferq worker` processes, Redis, Postgres and the
real vLLM engine on the tiny model."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from jsonschema import Draft202012Validator
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from storage.tables import LedgerEntry
from tests.conftest import new_tenant

SCHEMA = json.loads((Path(__file__).parents[1] / "inferq/data/product_schema.json").read_text())
TEXT = "Nordkap waterproof hiking jacket in forest green, size M, recycled polyester shell."


def submit(client: httpx.Client, body: dict[str, object]) -> str:
    response = client.post("/v1/requests", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def result(client: httpx.Client, request_id: str) -> dict[str, object]:
    """Long-poll until the request is terminal (bounded by the API's own wait limit)."""
    for _ in range(20):
        body = client.get(f"/v1/requests/{request_id}", params={"wait": 30}).json()
        if body["status"] in ("succeeded", "failed", "expired", "cancelled"):
            return dict(body)
    raise AssertionError(f"request {request_id} never finished: {body}")


def test_submit_poll_result_classify(client: httpx.Client) -> None:
    labels = ["outdoor", "kitchen", "office"]
    request_id = submit(client, {"task": "classify", "input": {"text": TEXT, "labels": labels}})
    answer = result(client, request_id)
    assert answer["status"] == "succeeded", answer
    assert answer["output"] in labels
    assert answer["model"] == "tiny"
    usage = answer["usage"]
    assert isinstance(usage, dict) and usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    latency = answer["latency"]
    assert isinstance(latency, dict) and latency["total_s"] >= latency["ttft_s"] > 0


def test_extract_result_validates_against_schema(client: httpx.Client) -> None:
    request_id = submit(client, {"task": "extract", "input": {"text": TEXT, "schema": SCHEMA}})
    answer = result(client, request_id)
    assert answer["status"] == "succeeded", answer
    assert list(Draft202012Validator(SCHEMA).iter_errors(answer["output"])) == []


def test_expand_returns_n_variants_and_chat_returns_text(client: httpx.Client) -> None:
    expand = submit(client, {"task": "expand", "input": {"query": "red running shoes", "n": 3}})
    chat = submit(
        client, {"task": "chat", "input": {"messages": [{"role": "user", "content": "hi"}]}}
    )
    variants = result(client, expand)["output"]
    assert isinstance(variants, list) and len(variants) == 3
    assert isinstance(result(client, chat)["output"], str)


def test_64_requests_run_in_batches(client: httpx.Client, sessions: sessionmaker[Session]) -> None:
    body = {
        "task": "complete",
        "input": {"prompt": "Write a product title:"},
        "params": {"max_tokens": 16, "ignore_eos": True},
        "priority": "batch",
    }
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda _: submit(client, body), range(64)))
    answers = [result(client, i) for i in ids]
    assert all(a["status"] == "succeeded" for a in answers)
    with sessions() as session:
        rows = session.execute(
            select(
                LedgerEntry.batch_id, LedgerEntry.batch_size, LedgerEntry.completion_tokens
            ).where(LedgerEntry.request_id.in_([uuid.UUID(i) for i in ids]))
        ).all()
    assert len(rows) == 64  # one attempt each
    assert all(r.completion_tokens == 16 for r in rows)
    assert max(r.batch_size for r in rows) > 1
    assert len({r.batch_id for r in rows}) < 64


def test_ledger_records_the_attempt(client: httpx.Client, sessions: sessionmaker[Session]) -> None:
    request_id = submit(client, {"task": "complete", "input": {"prompt": "Hello"}})
    assert result(client, request_id)["status"] == "succeeded"
    with sessions() as session:
        entry = session.scalars(
            select(LedgerEntry).where(LedgerEntry.request_id == uuid.UUID(request_id))
        ).one()
    assert entry.engine == "vllm" and entry.model == "tiny"
    assert entry.outcome == "succeeded"
    assert entry.prompt_tokens > 0 and entry.completion_tokens > 0
    assert entry.ttft_s is not None and 0 < entry.ttft_s <= entry.engine_s
    assert entry.queue_wait_s >= 0 and entry.gpu_seconds > 0
    assert entry.cost == pytest.approx(
        entry.gpu_seconds * 2.0 / 3600
    )  # price_per_gpu_hour in tests/config.yaml


def test_tenants_see_only_their_own_requests(
    client: httpx.Client, api_url: str, sessions: sessionmaker[Session]
) -> None:
    request_id = submit(client, {"task": "complete", "input": {"prompt": "mine"}})
    other_tenant = new_tenant(sessions, "other")
    other = httpx.get(f"{api_url}/v1/requests/{request_id}", headers=other_tenant.headers)
    assert other.status_code == 404
    assert client.get(f"/v1/requests/{request_id}").status_code == 200


def test_idempotency_key_returns_the_original(client: httpx.Client) -> None:
    body = {"task": "complete", "input": {"prompt": "once"}, "idempotency_key": "order-42"}
    first, second = submit(client, body), submit(client, body)
    assert first == second


def test_models_are_listed(client: httpx.Client) -> None:
    models = client.get("/v1/models").json()["data"]
    assert {m["id"] for m in models} == {"tiny", "scripted", "parked", "tiny-embed"}


def test_poison_request_fails_alone(client: httpx.Client) -> None:
    """The scripted engine fails any batch holding POISON; its neighbours still succeed."""
    bodies = [
        {"task": "complete", "model": "scripted", "input": {"prompt": f"item {i}"}}
        for i in range(15)
    ]
    bodies.insert(7, {"task": "complete", "model": "scripted", "input": {"prompt": "POISON"}})
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda b: submit(client, b), bodies))
    answers = [result(client, i) for i in ids]
    failed = [a for a in answers if a["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["error"] == "EngineError: poisoned input"
    assert sum(a["status"] == "succeeded" for a in answers) == 15
