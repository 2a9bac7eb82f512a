"""Limits on what reaches the engine and the validators, end to end on the real API: a JSON
schema over the size or depth limit (settings, named in the message), or with a regex that
RE2 cannot match in linear time (backreferences, lookaround), is refused on every surface
(native requests, job items, chat completions, batch lines) and nothing is written.

Everything names the ``parked`` model (no worker), so nothing accepted runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from tests.conftest import service_env, start_api, stop
from tests.test_bad_input import create_batch, rows_for_key


def nested(levels: int) -> dict[str, Any]:
    """An object schema whose JSON is ``levels`` deep (each property level adds two)."""
    schema: dict[str, Any] = {"type": "string"}
    depth = 1
    while depth + 2 <= levels:
        schema = {"type": "object", "properties": {"a": schema}}
        depth += 2
    return schema


def extract(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": "parked",
        "task": "extract",
        "input": {"text": "x", "schema": schema},
        "params": {"max_tokens": 4},  # parked's context is 128 tokens
    }


def with_pattern(pattern: str) -> dict[str, Any]:
    return {"type": "object", "properties": {"x": {"type": "string", "pattern": pattern}}}


BAD_SCHEMAS = [
    pytest.param(nested(33), "nested 33 levels deep; the limit is 32", id="too deep"),
    pytest.param(
        {"type": "object", "description": "x" * 100_000},
        "characters as JSON; the limit is 100000 (INFERQ_MAX_SCHEMA_CHARS)",
        id="too large",
    ),
    pytest.param(with_pattern(r"^(a)\1$"), "pattern '^(a)\\\\1$' is not supported", id="backref"),
    pytest.param(with_pattern("^(?=a)a+$"), "without backreferences or lookaround", id="lookahead"),
    pytest.param(
        {"type": "object", "patternProperties": {"(?<!x)y": {}}},
        "is not supported",
        id="lookbehind in patternProperties",
    ),
    pytest.param(
        {"type": "object", "patternProperties": {"^a": {}}, "unevaluatedProperties": False},
        "unevaluatedProperties cannot be combined with patternProperties",
        id="unevaluatedProperties with patternProperties",
    ),
]


@pytest.mark.parametrize(("schema", "message"), BAD_SCHEMAS)
def test_native_requests_refuse_the_schema_naming_why(
    client: httpx.Client,
    api_key: str,
    sessions: sessionmaker[Session],
    schema: dict[str, Any],
    message: str,
) -> None:
    response = client.post("/v1/requests", json=extract(schema))
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail.startswith("input.schema: "), detail
    assert message in detail, detail
    chat = {
        "model": "parked",
        "task": "chat",
        "input": {"messages": [{"role": "user", "content": "hi"}], "json_schema": schema},
    }
    response = client.post("/v1/requests", json=chat)
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]
    assert rows_for_key(sessions, api_key) == 0


def test_schemas_at_the_limits_and_linear_patterns_are_accepted(
    client: httpx.Client, api_key: str, sessions: sessionmaker[Session]
) -> None:
    for schema in (
        nested(31),
        {"type": "object", "description": "x" * 99_900},
        with_pattern(r"^(a+)+$"),  # catastrophic for a backtracking engine, linear in RE2
        {"type": "object", "patternProperties": {"^[a-z]+\\d{2,4}$": {"type": "string"}}},
        {"type": "object", "properties": {"x": {"const": {"pattern": "(a)\\1"}}}},  # data
    ):
        response = client.post("/v1/requests", json=extract(schema))
        assert response.status_code == 202, response.text
    assert rows_for_key(sessions, api_key) == 5


def test_a_job_line_with_a_bad_schema_is_refused_alone(
    client: httpx.Client, api_key: str, sessions: sessionmaker[Session]
) -> None:
    items = [
        {"id": "good", "text": "a"},
        {"id": "deep", "input": {"text": "b", "schema": nested(40)}},
        {"id": "backref", "input": {"text": "c", "schema": with_pattern(r"(x)\1")}},
    ]
    body = {
        "task": "extract",
        "model": "parked",
        "input": {"schema": {"type": "object"}},
        "params": {"max_tokens": 4},
        "items": items,
    }
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["total"], job["invalid"]) == (1, 2)
    errors = [
        json.loads(line) for line in client.get(f"/v1/jobs/{job['id']}/errors").text.splitlines()
    ]
    by_line = {e["line"]: e["error"] for e in errors}
    assert "INFERQ_MAX_SCHEMA_DEPTH" in by_line[2], by_line
    assert "RE2" in by_line[3], by_line
    client.post(f"/v1/jobs/{job['id']}/cancel")  # parked: it would wait forever
    assert rows_for_key(sessions, api_key) == 1


def chat_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": "parked",
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    }


def test_chat_completions_and_batch_lines_refuse_the_schema(
    client: httpx.Client, api_key: str, sessions: sessionmaker[Session]
) -> None:
    response = client.post("/v1/chat/completions", json=chat_body(nested(50)))
    assert response.status_code == 400, response.text
    assert "INFERQ_MAX_SCHEMA_DEPTH" in response.json()["error"]["message"]
    response = client.post("/v1/chat/completions", json=chat_body(with_pattern("(?=a)")))
    assert response.status_code == 400, response.text
    assert "RE2" in response.json()["error"]["message"]

    def line(custom_id: str, schema: dict[str, Any]) -> bytes:
        body = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions"}
        return json.dumps({**body, "body": chat_body(schema)}).encode()

    batch = create_batch(client, [line("deep", nested(40)), line("re", with_pattern("(a)\\1"))])
    assert batch["status"] == "failed", batch  # no good line: nothing runs
    messages = {e["line"]: e["message"] for e in batch["errors"]["data"]}
    assert "INFERQ_MAX_SCHEMA_DEPTH" in messages[1], messages
    assert "RE2" in messages[2], messages
    assert rows_for_key(sessions, api_key) == 0


@pytest.fixture(scope="module")
def tight_url(settings: Settings, log_dir: Path) -> Iterator[str]:
    """A second ``inferq api`` with small schema limits from the environment."""
    env = service_env(settings)
    env.update(
        INFERQ_MAX_SCHEMA_DEPTH="5", INFERQ_MAX_SCHEMA_CHARS="300", INFERQ_RECONCILER="false"
    )
    process, url = start_api(env, log_dir, "api-schema-limits")
    yield url
    stop(process)


def test_the_limits_come_from_the_settings(
    tight_url: str, api_key: str, sessions: sessionmaker[Session]
) -> None:
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=tight_url, headers=headers, timeout=60) as tight:
        deep = tight.post("/v1/requests", json=extract(nested(7)))
        large = tight.post(
            "/v1/requests", json=extract({"type": "object", "description": "x" * 300})
        )
        fits = tight.post("/v1/requests", json=extract(nested(5)))
    assert deep.status_code == 422, deep.text
    assert "nested 7 levels deep; the limit is 5 (INFERQ_MAX_SCHEMA_DEPTH)" in deep.json()["detail"]
    assert large.status_code == 422, large.text
    assert "the limit is 300 (INFERQ_MAX_SCHEMA_CHARS)" in large.json()["detail"]
    assert fits.status_code == 202, fits.text
    assert rows_for_key(sessions, api_key) == 1
