"""Bad input: a 4xx whose message names the problem, and nothing written or enqueued.

Requests here name the `parked` model, which no worker serves, so anything published would
still sit on its queue; a valid request proves that check can fail.
"""

from __future__ import annotations

import uuid

import httpx
import pytest
import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from inferq.settings import Settings
from storage.models import Request
from storage.tenants import hash_key

SCHEMA = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}


def parked(body: dict[str, object]) -> dict[str, object]:
    return {"model": "parked", **body}


BAD = [
    pytest.param({"task": "summarise", "input": {"text": "x"}}, "task", id="unknown task kind"),
    pytest.param(
        parked({"task": "extract", "input": {"text": "x", "schema": {"type": "nonsense"}}}),
        "not a valid JSON Schema",
        id="invalid JSON schema",
    ),
    pytest.param(
        parked({"task": "complete", "input": {"prompt": "   "}}),
        "input.prompt: Value error, must not be empty",
        id="empty input",
    ),
    pytest.param(
        parked({"task": "classify", "input": {"text": "x", "labels": []}}),
        "input.labels",
        id="no labels",
    ),
    pytest.param(
        {"task": "complete", "model": "gpt-17", "input": {"prompt": "x"}},
        "unknown model 'gpt-17'",
        id="unknown model",
    ),
    pytest.param(
        parked({"task": "complete", "input": {"prompt": "word " * 400}}),
        "exceeds parked's context of 128 tokens",
        id="prompt longer than context",
    ),
    pytest.param(
        parked({"task": "complete", "input": {"prompt": "x"}, "params": {"max_tokens": 500}}),
        "params.max_tokens must be between 1 and 127",
        id="max_tokens above the model's limit",
    ),
    pytest.param(
        parked({"task": "complete", "input": {"prompt": "x"}, "params": {"max_tokens": 0}}),
        "max_tokens",
        id="max_tokens zero",
    ),
    pytest.param(
        parked({"task": "expand", "input": {"query": "x", "n": 3}, "params": {"temperature": 0}}),
        "temperature > 0",
        id="n variants with greedy sampling",
    ),
]


def queued_on(settings: Settings, model: str) -> int:
    """Messages waiting on a model's queue, across kombu's per-priority lists."""
    client = redis.Redis.from_url(settings.broker_url)
    pattern = f"{settings.broker_key_prefix}inferq.model.{model}*"
    return sum(int(client.llen(key)) for key in client.scan_iter(pattern))


def rows_for_key(sessions: sessionmaker[Session], key: str) -> int:
    from storage.models import ApiKey

    with sessions() as session:
        tenant_id = session.scalar(select(ApiKey.tenant_id).where(ApiKey.key_hash == hash_key(key)))
        return int(session.scalar(select(func.count()).where(Request.tenant_id == tenant_id)) or 0)


@pytest.mark.parametrize(("body", "message"), BAD)
def test_bad_request_is_refused_and_nothing_is_kept(
    client: httpx.Client,
    api_key: str,
    settings: Settings,
    sessions: sessionmaker[Session],
    body: dict[str, object],
    message: str,
) -> None:
    before = queued_on(settings, "parked")
    response = client.post("/v1/requests", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert message in response.text
    assert rows_for_key(sessions, api_key) == 0
    assert queued_on(settings, "parked") == before


def test_valid_request_to_parked_model_is_kept_and_queued(
    client: httpx.Client, api_key: str, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    """The control for the test above: its checks do see a request that was accepted."""
    before = queued_on(settings, "parked")
    response = client.post(
        "/v1/requests", json=parked({"task": "complete", "input": {"prompt": "x"}})
    )
    assert response.status_code == 202, response.text
    assert rows_for_key(sessions, api_key) == 1
    assert queued_on(settings, "parked") == before + 1


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        pytest.param({}, "missing API key", id="no key"),
        pytest.param({"Authorization": "Bearer iq_not-a-key"}, "invalid API key", id="wrong key"),
        pytest.param({"Authorization": "Basic dXNlcjpwdw=="}, "missing API key", id="wrong scheme"),
    ],
)
def test_missing_or_wrong_key_is_401(api_url: str, headers: dict[str, str], message: str) -> None:
    body = {"task": "complete", "input": {"prompt": "x"}}
    response = httpx.post(f"{api_url}/v1/requests", json=body, headers=headers)
    assert response.status_code == 401
    assert message in response.json()["detail"]
    assert httpx.get(f"{api_url}/v1/requests/{uuid.uuid4()}", headers=headers).status_code == 401


def test_oversized_body_is_413(client: httpx.Client) -> None:
    response = client.post(
        "/v1/requests", json={"task": "complete", "input": {"prompt": "x" * 1_100_000}}
    )
    assert response.status_code == 413
    assert "limit" in response.json()["detail"]
