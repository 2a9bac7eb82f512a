"""Abuse limits, end to end: an API process started with tight limits refuses oversized
bodies (413), and ``max_tokens``, ``n`` and prompts over the limits (422 natively, 400 in the
OpenAI shape) on every surface: native requests, job items, batch lines, chat completions.
Each refusal names the limit, and nothing refused is written.

Everything names the ``parked`` model (context 128, no worker), so nothing accepted runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from storage.tables import ApiKey, Job, Request
from storage.tenants import hash_key
from tests.conftest import service_env, start_api, stop

MAX_BODY = 20_000
MAX_TOKENS = 8
MAX_N = 2
LONG_PROMPT = "word " * 200  # over parked's context of 128 tokens


@pytest.fixture(scope="module")
def strict_url(settings: Settings, log_dir: Path) -> Iterator[str]:
    """A second ``inferq api`` on the same database, with tight limits from the environment."""
    env = service_env(settings)
    env.update(
        INFERQ_MAX_BODY_BYTES=str(MAX_BODY),
        INFERQ_MAX_OUTPUT_TOKENS=str(MAX_TOKENS),
        INFERQ_MAX_N=str(MAX_N),
        INFERQ_RECONCILER="false",
    )
    process, url = start_api(env, log_dir, "api-strict")
    yield url
    stop(process)


@pytest.fixture
def strict(strict_url: str, api_key: str) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=strict_url, headers=headers, timeout=60) as http:
        yield http


def kept(sessions: sessionmaker[Session], key: str) -> tuple[int, int]:
    """The tenant's (requests, jobs) in the database."""
    with sessions() as session:
        tenant = session.scalar(select(ApiKey.tenant_id).where(ApiKey.key_hash == hash_key(key)))
        count = select(func.count())
        return (
            int(session.scalar(count.where(Request.tenant_id == tenant)) or 0),
            int(session.scalar(count.where(Job.tenant_id == tenant)) or 0),
        )


def native(task: str, input_: dict[str, object], **params: object) -> dict[str, object]:
    return {"task": task, "model": "parked", "input": input_, "params": params}


def chat(content: str = "hi", **extra: object) -> dict[str, object]:
    return {"model": "parked", "messages": [{"role": "user", "content": content}], **extra}


def refused_natively(response: httpx.Response, message: str) -> None:
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"], response.text


def refused_openai(response: httpx.Response, message: str, status: int = 400) -> None:
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"], response.text


def failed_batch_says(client: httpx.Client, body: dict[str, object], message: str) -> None:
    """A batch whose only line is ``body`` fails, its error naming the limit."""
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
    files = {"file": ("in.jsonl", json.dumps(line).encode() + b"\n")}
    upload = client.post("/v1/files", data={"purpose": "batch"}, files=files)
    assert upload.status_code == 200, upload.text
    spec = {
        "input_file_id": upload.json()["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    batch = client.post("/v1/batches", json=spec).json()
    assert batch["status"] == "failed", batch
    assert message in batch["errors"]["data"][0]["message"], batch


def test_max_tokens_over_the_limit_is_refused_everywhere(
    strict: httpx.Client, api_key: str, sessions: sessionmaker[Session]
) -> None:
    said = f"max_tokens must be between 1 and {MAX_TOKENS}"
    prompt = {"prompt": "x"}
    refused_natively(
        strict.post("/v1/requests", json=native("complete", prompt, max_tokens=9)), said
    )
    job = {"task": "complete", "model": "parked", "params": {"max_tokens": 9}, "items": [prompt]}
    refused_natively(strict.post("/v1/jobs", json=job), said)
    refused_openai(strict.post("/v1/chat/completions", json=chat(max_tokens=9)), said)
    failed_batch_says(strict, chat(max_tokens=9), said)
    assert kept(sessions, api_key) == (0, 0)
    ok = strict.post("/v1/requests", json=native("complete", prompt, max_tokens=MAX_TOKENS))
    assert ok.status_code == 202, ok.text
    assert kept(sessions, api_key) == (1, 0)


def test_n_over_the_limit_is_refused(
    strict: httpx.Client, api_key: str, sessions: sessionmaker[Session]
) -> None:
    def expand(n: int) -> dict[str, object]:
        return native("expand", {"query": "red boots", "n": n}, temperature=0.7)

    refused_natively(strict.post("/v1/requests", json=expand(MAX_N + 1)), f"at most {MAX_N}")
    job = {**expand(MAX_N + 1), "items": [{"query": "a"}]}
    job["input"] = {"n": MAX_N + 1}
    refused_natively(strict.post("/v1/jobs", json=job), f"at most {MAX_N}")
    refused_openai(strict.post("/v1/chat/completions", json=chat(n=2)), "body.n")
    assert kept(sessions, api_key) == (0, 0)
    assert strict.post("/v1/requests", json=expand(MAX_N)).status_code == 202


def test_prompt_over_the_context_is_refused_everywhere(
    strict: httpx.Client, api_key: str, sessions: sessionmaker[Session]
) -> None:
    said = "exceeds parked's context of 128 tokens"
    long = {"prompt": LONG_PROMPT}
    refused_natively(strict.post("/v1/requests", json=native("complete", long)), said)
    refused_openai(strict.post("/v1/chat/completions", json=chat(LONG_PROMPT)), said)
    failed_batch_says(strict, chat(LONG_PROMPT), said)
    assert kept(sessions, api_key) == (0, 0)
    # In a job, the long line alone is refused; the rest is accepted.
    job = {"task": "complete", "model": "parked", "items": [{"prompt": "hi"}, long]}
    accepted = strict.post("/v1/jobs", json=job)
    assert accepted.status_code == 202, accepted.text
    errors = strict.get(f"/v1/jobs/{accepted.json()['id']}/errors").text.splitlines()
    assert [json.loads(e)["line"] for e in errors] == [2] and said in errors[0]
    assert kept(sessions, api_key) == (1, 1)


HEAD = b'{"task": "complete", "model": "parked", "input": {"prompt": "x"}'


def padded(size: int) -> Iterator[bytes]:
    """A valid request of ``size`` bytes or more, padded with JSON whitespace (so its size is
    all that is wrong with it), sent chunked: with no Content-Length."""
    yield HEAD
    for _ in range(size // 4096 + 1):
        yield b" " * 4096
    yield b"}"


@pytest.mark.parametrize("path", ["/v1/requests", "/v1/chat/completions"])
def test_oversized_body_is_413_with_or_without_a_length(
    strict: httpx.Client, api_key: str, sessions: sessionmaker[Session], path: str
) -> None:
    json_type = {"content-type": "application/json"}
    by_length = strict.post(path, content=b"".join(padded(MAX_BODY)), headers=json_type)
    chunked = strict.post(path, content=padded(MAX_BODY), headers=json_type)
    for response, said in [(by_length, "bytes; the limit is"), (chunked, "over the limit of")]:
        assert response.status_code == 413, response.text
        body = response.json()
        message = body["error"]["message"] if path.startswith("/v1/chat") else body["detail"]
        assert said in message and str(MAX_BODY) in message, message
    assert kept(sessions, api_key) == (0, 0)
    small = strict.post("/v1/requests", content=padded(MAX_BODY // 2), headers=json_type)
    assert small.status_code == 202, small.text  # chunked, under the limit: read whole
    assert kept(sessions, api_key) == (1, 0)


def test_defaults() -> None:
    """The shipped limits: a request of at most 4096 new tokens, 16 variants, 1 MB."""
    fields = Settings.model_fields
    assert fields["max_output_tokens"].default == 4096
    assert fields["max_n"].default == 16
    assert fields["max_body_bytes"].default == 1_000_000
