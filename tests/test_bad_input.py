"""Bad input: a 4xx whose message names the problem, and nothing written or enqueued.

Requests here name the `parked` model, which no worker serves, so anything published would
still sit on its queue; a valid request proves that check can fail.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from storage.tables import Request
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
    from storage.tables import ApiKey

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


# Sampling parameters the engine cannot take: refused before anything is written. A seed past
# int64 with temperature > 0 used to wedge vLLM ("Overflow when unpacking long long").

SEED_MAX = 2**63 - 1
PROMPT = {"task": "complete", "input": {"prompt": "hi"}}


def test_seed_past_int64_is_refused_and_nothing_is_kept(
    client: httpx.Client, api_key: str, sessions: sessionmaker[Session]
) -> None:
    body = {**PROMPT, "params": {"temperature": 0.8, "seed": 18446744073709551616}}
    response = client.post("/v1/requests", json=body)
    assert response.status_code == 422, response.text
    [issue] = response.json()["detail"]
    assert issue["loc"] == ["body", "params", "seed"]
    assert str(SEED_MAX) in issue["msg"]
    assert rows_for_key(sessions, api_key) == 0


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        pytest.param(b'{"temperature": NaN}', "temperature", id="NaN temperature"),
        pytest.param(b'{"temperature": Infinity}', "temperature", id="infinite temperature"),
        pytest.param(b'{"top_p": NaN}', "top_p", id="NaN top_p"),
        pytest.param(b'{"top_p": -Infinity}', "top_p", id="negative infinite top_p"),
    ],
)
def test_non_finite_sampling_is_refused_not_a_server_error(
    client: httpx.Client,
    api_key: str,
    sessions: sessionmaker[Session],
    raw: bytes,
    field: str,
) -> None:
    """Python's json reads NaN and Infinity; the 422 echoes them as text, not a 500."""
    body = b'{"task": "complete", "model": "parked", "input": {"prompt": "hi"}, "params": '
    response = client.post(
        "/v1/requests", content=body + raw + b"}", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    [issue] = response.json()["detail"]
    assert issue["loc"] == ["body", "params", field]
    assert "finite" in issue["msg"]
    assert rows_for_key(sessions, api_key) == 0


BAD_PARAMS = [
    pytest.param({"seed": -1}, "seed", id="negative seed"),
    pytest.param({"seed": SEED_MAX + 1}, "seed", id="seed 2**63"),
    pytest.param({"seed": 1.5}, "seed", id="fractional seed"),
    pytest.param({"temperature": 2.5}, "temperature", id="temperature over 2"),
    pytest.param({"top_p": 0}, "top_p", id="top_p zero"),
    pytest.param({"max_tokens": 10**30}, "max_tokens", id="max_tokens past any cap"),
    pytest.param({"stop": [""]}, "stop", id="empty stop string"),
    pytest.param({"stop": ["end\u0000"]}, "stop", id="stop string with NUL"),
    pytest.param({"stop": ["x" * 201]}, "stop", id="stop string over 200 chars"),
    pytest.param({"stop": ["a", "b", "c", "d", "e"]}, "stop", id="five stop strings"),
    pytest.param({"stop": "end"}, "stop", id="stop not a list"),
    pytest.param({"logprobs": 5}, "logprobs", id="unknown knob"),
]


@pytest.mark.parametrize(("params", "field"), BAD_PARAMS)
def test_bad_sampling_names_the_field_and_keeps_nothing(
    client: httpx.Client,
    api_key: str,
    settings: Settings,
    sessions: sessionmaker[Session],
    params: dict[str, object],
    field: str,
) -> None:
    before = queued_on(settings, "parked")
    response = client.post("/v1/requests", json=parked({**PROMPT, "params": params}))
    assert response.status_code == 422, response.text
    assert names_param(response.json()["detail"], field), response.text
    assert rows_for_key(sessions, api_key) == 0
    assert queued_on(settings, "parked") == before


def names_param(detail: str | list[dict[str, object]], field: str) -> bool:
    """A 422 names ``params.<field>``: in its sentence, or as the ``loc`` of an issue."""
    if isinstance(detail, str):
        return f"params.{field}" in detail
    return any(issue["loc"][:3] == ["body", "params", field] for issue in detail)


def test_the_largest_seed_and_edge_stop_strings_are_accepted(
    client: httpx.Client, api_key: str, sessions: sessionmaker[Session]
) -> None:
    params = {"temperature": 0.8, "seed": SEED_MAX, "stop": ["\n", "x" * 200, "a", "b"]}
    response = client.post("/v1/requests", json=parked({**PROMPT, "params": params}))
    assert response.status_code == 202, response.text
    zero = client.post("/v1/requests", json=parked({**PROMPT, "params": {"seed": 0}}))
    assert zero.status_code == 202, zero.text
    assert rows_for_key(sessions, api_key) == 2


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        pytest.param(
            b'{"task": "extract", "input": {"text": "x", "schema": {"type": "object", '
            b'"properties": {"n": {"type": "number", "maximum": NaN}}}}}',
            "input.schema",
            id="NaN in a JSON schema",
        ),
        pytest.param(
            b'{"task": "chat", "input": {"messages": [{"role": "user", "content": "hi"}], '
            b'"json_schema": {"type": "object", "minProperties": Infinity}}}',
            "input.json_schema",
            id="Infinity in a chat's schema",
        ),
    ],
)
def test_nan_inside_the_input_is_refused_not_a_server_error(
    client: httpx.Client, api_key: str, sessions: sessionmaker[Session], raw: bytes, field: str
) -> None:
    """NaN is not JSON: Postgres refuses it, so the API must, naming where it is."""
    body = b'{"model": "parked", ' + raw[1:]
    response = client.post(
        "/v1/requests", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert f"{field}: Value error, NaN and Infinity are not JSON" in response.json()["detail"]
    assert rows_for_key(sessions, api_key) == 0


def test_bad_job_params_refuse_the_job_and_keep_nothing(
    client: httpx.Client, api_key: str, sessions: sessionmaker[Session]
) -> None:
    """A job's params are shared by its lines: a bad one refuses the whole job."""
    items = [{"id": "a", "prompt": "hi"}, {"id": "b", "prompt": "there"}]
    for params, field in [({"seed": 2**64}, "seed"), ({"max_tokens": 10**9}, "max_tokens")]:
        body = {"task": "complete", "model": "parked", "params": params, "items": items}
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 422, response.text
        assert field in response.text
    shared_nan = b'{"task": "extract", "input": {"schema": {"maximum": NaN}}, "items": []}'
    response = client.post(
        "/v1/jobs", content=shared_nan, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422 and "input" in response.text, response.text
    assert client.get("/v1/jobs").json()["data"] == []
    assert rows_for_key(sessions, api_key) == 0


# The OpenAI surface takes the same values (its errors are 400s in OpenAI's shape).


def chat(**knobs: object) -> dict[str, object]:
    return {"model": "parked", "messages": [{"role": "user", "content": "hi"}], **knobs}


@pytest.mark.parametrize(
    ("knobs", "field"),
    [
        pytest.param({"temperature": 0.8, "seed": 2**64}, "seed", id="seed past int64"),
        pytest.param({"seed": -1}, "seed", id="negative seed"),
        pytest.param({"seed": SEED_MAX + 1}, "seed", id="seed 2**63"),
        pytest.param({"stop": ""}, "stop", id="empty stop string"),
        pytest.param({"stop": "end\u0000"}, "stop", id="stop string with NUL"),
        pytest.param({"stop": ["x" * 201]}, "stop", id="stop string over 200 chars"),
        pytest.param({"stop": ["a", "b", "c", "d", "e"]}, "stop", id="five stop strings"),
        pytest.param({"n": 2}, "n", id="n over 1"),
        pytest.param({"logprobs": True}, "logprobs", id="logprobs"),
        pytest.param({"max_tokens": 10**30}, "max_tokens", id="max_tokens past any cap"),
    ],
)
def test_chat_completions_refuse_bad_sampling(
    client: httpx.Client,
    api_key: str,
    sessions: sessionmaker[Session],
    knobs: dict[str, object],
    field: str,
) -> None:
    response = client.post("/v1/chat/completions", json=chat(**knobs))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and field in error["message"]
    assert rows_for_key(sessions, api_key) == 0


def test_chat_completions_refuse_nan_temperature(
    client: httpx.Client, api_key: str, sessions: sessionmaker[Session]
) -> None:
    raw = b'{"model": "parked", "messages": [{"role": "user", "content": "hi"}], '
    response = client.post(
        "/v1/chat/completions",
        content=raw + b'"temperature": NaN}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert "temperature" in response.json()["error"]["message"]
    assert rows_for_key(sessions, api_key) == 0


def test_chat_completions_refuse_nan_in_the_response_format(
    client: httpx.Client, api_key: str, sessions: sessionmaker[Session]
) -> None:
    raw = (
        b'{"model": "parked", "messages": [{"role": "user", "content": "hi"}], '
        b'"response_format": {"type": "json_schema", "json_schema": {"name": "x", '
        b'"schema": {"type": "object", "maxProperties": NaN}}}}'
    )
    response = client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert "NaN and Infinity are not JSON" in response.json()["error"]["message"]
    assert rows_for_key(sessions, api_key) == 0


def create_batch(client: httpx.Client, lines: list[bytes]) -> dict[str, Any]:
    """Upload Batch API lines and create a batch of them; the batch as created."""
    upload = client.post(
        "/v1/files",
        files={"file": ("lines.jsonl", b"\n".join(lines) + b"\n")},
        data={"purpose": "batch"},
    )
    assert upload.status_code == 200, upload.text
    created = client.post(
        "/v1/batches",
        json={
            "input_file_id": upload.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    assert created.status_code == 200, created.text
    batch: dict[str, Any] = created.json()
    return batch


def test_batch_lines_with_bad_sampling_are_refused_line_by_line(
    client: httpx.Client, api_key: str, sessions: sessionmaker[Session]
) -> None:
    def line(custom_id: str, knobs: str) -> bytes:
        """A Batch API line written by hand: ``knobs`` may hold what json.dumps would not."""
        body = f'{{"model": "parked", "messages": [{{"role": "user", "content": "hi"}}]{knobs}}}'
        head = f'{{"custom_id": "{custom_id}", "method": "POST", "url": "/v1/chat/completions"'
        return f'{head}, "body": {body}}}'.encode()

    bad = [
        line("seed", ', "temperature": 0.8, "seed": 18446744073709551616'),
        line("nan", ', "temperature": NaN'),
        line("stop", ', "stop": ["a", ""]'),
    ]
    batch = create_batch(client, bad)
    assert batch["status"] == "failed"  # no good line: nothing runs
    messages = {e["line"]: e["message"] for e in batch["errors"]["data"]}
    assert messages[1].startswith("body.seed:"), messages
    assert messages[2].startswith("body.temperature:"), messages
    assert messages[3].startswith("body.stop:"), messages
    assert rows_for_key(sessions, api_key) == 0

    good = line("good", ', "seed": 7')
    batch = create_batch(client, [good, *bad])
    assert batch["status"] == "in_progress"
    assert batch["request_counts"]["total"] == 4
    assert rows_for_key(sessions, api_key) == 1  # the good line only
    client.post(f"/v1/batches/{batch['id']}/cancel")  # parked: it would wait forever
