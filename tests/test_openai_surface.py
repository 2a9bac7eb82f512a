"""The wider OpenAI surface through the official `openai` client, pinned and unmodified:
``/v1/completions`` and ``/v1/embeddings`` (synchronous and as Batch API endpoints),
``/v1/responses`` batches, and the Batch API's signed webhook events. Real API and worker
processes; the scripted engine for exact answers, vLLM on the tiny model (and the tiny model
as a pooling model, ``tiny-embed``, in one worker this module starts) for the real path."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types import Batch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core import signing
from core.enums import TaskKind
from core.settings import Settings
from storage.tables import utcnow
from storage.webhooks import Outgoing, WebhookDelivery, register_endpoint
from tasks.templates import OutputError, SamplingIn, parse_output, render
from tests.conftest import Process, new_tenant, service_env, start_workers, wait_for
from workers.engines.scripted import scripted_answer, scripted_vector
from workers.webhooks import encode_body

ENDED = ("completed", "failed", "expired", "cancelled")


@pytest.fixture(scope="module")
def embed_worker(settings: Settings, log_dir: Path, api_url: str) -> Iterator[Process]:
    """One `inferq worker` for the tiny model run as a pooling model, for this module."""
    running = start_workers(service_env(settings), log_dir, ["tiny-embed"], tag="surface")
    worker = running["tiny-embed"]
    yield worker
    worker.proc.kill()  # nothing of this module is left in it to drain; a drain costs ~10 s
    worker.proc.wait()


@pytest.fixture
def client(api_url: str, api_key: str) -> OpenAI:
    return OpenAI(base_url=f"{api_url}/v1", api_key=api_key)


def line(custom_id: str, url: str, **body: Any) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).encode()


def run_batch(
    client: OpenAI, tmp_path: Path, endpoint: str, lines: list[bytes], *, window: str = "24h"
) -> Batch:
    path = tmp_path / f"batch-{uuid.uuid4().hex[:6]}.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with path.open("rb") as handle:
        upload = client.files.create(file=handle, purpose="batch")
    return client.batches.create(
        input_file_id=upload.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window=window,  # type: ignore[arg-type]
    )


def ended(client: OpenAI, batch_id: str) -> Batch:
    seen: list[Batch] = []

    def holds() -> bool:
        seen.append(client.batches.retrieve(batch_id))
        return seen[-1].status in ENDED

    wait_for(holds, timeout=120, what=f"batch {batch_id} to end")
    return seen[-1]


def jsonl(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    return [json.loads(text) for text in client.files.content(file_id).text.splitlines()]


def test_embed_kind_renders_and_needs_a_vector() -> None:
    request = render(TaskKind.EMBED, {"text": "red scarf"}, SamplingIn())
    assert (request.embed, request.prompt, request.messages) == (True, "red scarf", None)
    assert parse_output(TaskKind.EMBED, request, [], embedding=[0.6, 0.8]) == [0.6, 0.8]
    with pytest.raises(OutputError, match="not an embedding model"):
        parse_output(TaskKind.EMBED, request, ["some generated text"])
    assert scripted_answer(request).embedding == scripted_vector("red scarf")


def test_completions(client: OpenAI) -> None:
    exact = client.completions.create(
        model="scripted", prompt=["red scarf", "blue mug"], max_tokens=8, stop=["never"]
    )
    assert exact.object == "text_completion" and exact.id.startswith("cmpl-")
    assert [(c.index, c.text, c.finish_reason) for c in exact.choices] == [
        (0, "echo red scarf", "stop"),
        (1, "echo blue mug", "stop"),
    ]
    assert exact.usage is not None and exact.usage.prompt_tokens == 6  # scripted: words + 1
    assert exact.usage.completion_tokens == 6 and exact.usage.total_tokens == 12

    two = client.completions.create(
        model="scripted", prompt="tea", max_tokens=4, n=2, temperature=0.7, seed=3
    )
    assert [c.index for c in two.choices] == [0, 1]

    real = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6)
    assert real.model == "tiny" and real.usage is not None
    assert 1 <= real.usage.completion_tokens <= 6 and real.choices[0].finish_reason in (
        "stop",
        "length",
    )
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="Once upon a time",
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == real.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == (
        real.choices[0].finish_reason
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == (
        real.usage.completion_tokens
    )

    refusals: list[tuple[dict[str, Any], str]] = [
        ({"logprobs": 2}, "logprobs is not supported"),
        ({"echo": True}, "echo is not supported"),
        ({"prompt": [1, 2, 3]}, "token-id prompts are not supported"),
        ({"n": 2}, "n > 1 needs temperature > 0"),
        ({"model": "tiny-embed"}, "is an embedding model"),
        ({"model": "gpt-3.5-turbo-instruct"}, "is not configured"),
    ]
    for change, message in refusals:
        body: dict[str, Any] = {"model": "scripted", "prompt": "hi", "max_tokens": 4, **change}
        error = openai.NotFoundError if "configured" in message else openai.BadRequestError
        with pytest.raises(error, match=message):
            client.completions.create(**body)


def test_embeddings(client: OpenAI, embed_worker: Process) -> None:
    # The client asks for base64 by default and decodes it: float32 of the scripted vector.
    packed = client.embeddings.create(model="scripted", input=["red scarf", "blue mug"])
    assert packed.object == "list" and [d.index for d in packed.data] == [0, 1]
    for item, text in zip(packed.data, ["red scarf", "blue mug"], strict=True):
        assert item.embedding == pytest.approx(scripted_vector(text), abs=1e-6)
    assert packed.usage.prompt_tokens == packed.usage.total_tokens == 6
    floats = client.embeddings.create(model="scripted", input="red scarf", encoding_format="float")
    assert floats.data[0].embedding == scripted_vector("red scarf")

    real = client.embeddings.create(
        model="tiny-embed", input=["hello world", "goodbye moon", "hello world"]
    )
    first, other, again = (d.embedding for d in real.data)
    assert real.model == "tiny-embed" and len(first) == 128  # the tiny model's hidden size
    assert math.isclose(math.sqrt(sum(x * x for x in first)), 1.0, abs_tol=1e-4)  # normalised
    assert first == pytest.approx(again, abs=1e-5) and first != pytest.approx(other, abs=1e-3)
    assert real.usage.prompt_tokens > 0

    refusals: list[tuple[dict[str, Any], str]] = [
        ({"dimensions": 4}, "dimensions is not supported"),
        ({"input": [[1, 2, 3]]}, "token-id inputs are not supported"),
        ({"input": []}, "must not be an empty list"),
        ({"model": "tiny"}, "not an embedding model"),
    ]
    for change, message in refusals:
        with pytest.raises(openai.BadRequestError, match=message):
            client.embeddings.create(**{"model": "scripted", "input": "hi", **change})
    with pytest.raises(openai.BadRequestError, match="is an embedding model"):
        client.chat.completions.create(
            model="tiny-embed", messages=[{"role": "user", "content": "hi"}]
        )
    # The native API routes by task kind: a route ending on the wrong kind is refused at once.
    native = [
        ({"task": "embed", "input": {"text": "hi"}}, "not an embedding model"),
        (
            {
                "task": "chat",
                "input": {"messages": [{"role": "user", "content": "hi"}]},
                "model": "tiny-embed",
            },
            "is an embedding model",
        ),
    ]
    for body, message in native:
        answer = httpx.post(
            str(client.base_url).rstrip("/") + "/requests",
            json=body,
            headers={"Authorization": f"Bearer {client.api_key}"},
        )
        assert answer.status_code in (400, 422) and message in answer.text, answer.text


def test_batch_endpoints(client: OpenAI, embed_worker: Process, tmp_path: Path) -> None:
    completions = run_batch(
        client,
        tmp_path,
        "/v1/completions",
        [
            line("a", "/v1/completions", model="scripted", prompt="green tea", max_tokens=8),
            line("b", "/v1/completions", model="scripted", prompt=["x", "y"]),
            line("c", "/v1/chat/completions", model="scripted", messages=[]),
        ],
    )
    embeddings = run_batch(
        client,
        tmp_path,
        "/v1/embeddings",
        [
            line("e1", "/v1/embeddings", model="tiny-embed", input="hello world"),
            line("e2", "/v1/embeddings", model="scripted", input="red scarf"),
            line("e3", "/v1/embeddings", model="tiny", input="hi"),
        ],
    )
    responses = run_batch(
        client,
        tmp_path,
        "/v1/responses",
        [
            line(
                "r1", "/v1/responses", model="scripted", input="blue mug", instructions="Be brief"
            ),
            line("r2", "/v1/responses", model="scripted", input="x", tools=[{"type": "web"}]),
        ],
    )

    done = ended(client, completions.id)
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 2)
    [out] = jsonl(client, done.output_file_id)
    body = out["response"]["body"]
    assert out["custom_id"] == "a" and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "echo green tea"
    errors = {e["custom_id"]: e["error"]["message"] for e in jsonl(client, done.error_file_id)}
    assert "one prompt string and n 1" in errors["b"]
    assert "its endpoint is /v1/completions" in errors["c"]

    done = ended(client, embeddings.id)
    assert done.request_counts is not None and done.request_counts.completed == 2
    vectors = {o["custom_id"]: o["response"]["body"] for o in jsonl(client, done.output_file_id)}
    assert len(vectors["e1"]["data"][0]["embedding"]) == 128
    assert vectors["e2"]["data"][0]["embedding"] == scripted_vector("red scarf")
    [refused] = jsonl(client, done.error_file_id)
    assert refused["custom_id"] == "e3" and "not an embedding model" in refused["error"]["message"]

    done = ended(client, responses.id)
    [out] = jsonl(client, done.output_file_id)
    body = out["response"]["body"]
    assert (body["object"], body["status"]) == ("response", "completed")
    assert body["output"][0]["content"][0] == {
        "type": "output_text",
        "text": "echo blue mug",
        "annotations": [],
    }
    assert body["usage"]["total_tokens"] == (
        body["usage"]["input_tokens"] + body["usage"]["output_tokens"]
    )
    [refused] = jsonl(client, done.error_file_id)
    assert "body.tools" in refused["error"]["message"]

    with pytest.raises(openai.BadRequestError, match="endpoint '/v1/moderations'"):
        client.batches.create(
            input_file_id=done.input_file_id, endpoint="/v1/moderations", completion_window="24h"
        )


def test_batch_webhook_events(
    api_url: str, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    tenant = new_tenant(sessions, "hooks")
    client = OpenAI(base_url=f"{api_url}/v1", api_key=tenant.key)
    with sessions.begin() as session:
        endpoint = register_endpoint(session, tenant.id, "https://hooks.example.com/batches")
        secret = endpoint.secret

    chat = "/v1/chat/completions"
    failed = run_batch(client, tmp_path, chat, [line("a", chat, model="scripted", messages=[])])
    assert failed.status == "failed"  # no good line: failed at once
    good = [{"role": "user", "content": "hi"}]
    done = run_batch(client, tmp_path, chat, [line("a", chat, model="scripted", messages=good)])
    done = ended(client, done.id)
    parked = [line("p", chat, model="parked", messages=good)]
    cancelled = client.batches.cancel(run_batch(client, tmp_path, chat, parked).id)
    expiring = run_batch(client, tmp_path, chat, parked, window="1s")
    expired = ended(client, expiring.id)
    expected = {
        failed.id: "batch.failed",
        done.id: "batch.completed",
        cancelled.id: "batch.cancelled",
        expired.id: "batch.expired",
    }
    assert (done.status, cancelled.status, expired.status) == ("completed", "cancelled", "expired")

    def deliveries() -> list[WebhookDelivery]:
        with sessions() as session:
            query = select(WebhookDelivery).where(WebhookDelivery.tenant_id == tenant.id)
            return list(session.scalars(query))

    wait_for(lambda: len(deliveries()) >= 4, timeout=60, what="four batch events")
    seen = {}
    for row in deliveries():
        item = Outgoing(
            id=row.id,
            endpoint_id=row.endpoint_id,
            url="https://hooks.example.com/batches",
            secrets=(secret,),
            event_type=row.event_type,
            payload=row.payload,
            created_at=row.created_at,
            attempts=0,
            endpoint_disabled=False,
        )
        body = encode_body(item)
        headers = signing.headers(secret, str(row.id), body)
        event = client.webhooks.unwrap(body, headers, secret=secret)  # verifies the signature
        assert event.object == "event" and event.created_at <= int(utcnow().timestamp())
        seen[event.data.id] = event.type
        with pytest.raises(openai.InvalidWebhookSignatureError):
            client.webhooks.unwrap(body + b" ", headers, secret=secret)
    assert seen == expected
