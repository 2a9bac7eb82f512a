"""The OpenAI-compatible surface through the official `openai` client, pinned and unmodified
(only `base_url` and `api_key` point it at inferq): the documented batch flow with bad lines,
chat completions, list and cancel, the completion window as a deadline, tenant scoping and
refused uploads. Real API and worker processes, Postgres, Redis, vLLM on the tiny model."""

from __future__ import annotations

import http.client
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from jsonschema import Draft202012Validator
from openai import OpenAI
from openai.types import Batch
from openai.types.chat import ChatCompletion
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from tests.conftest import new_tenant, wait_for

ENDED = ("completed", "failed", "expired", "cancelled")
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "in_stock": {"type": "boolean"},
    },
    "required": ["colour", "in_stock"],
    "additionalProperties": False,
}


@pytest.fixture
def client(api_url: str, api_key: str) -> OpenAI:
    return OpenAI(base_url=f"{api_url}/v1", api_key=api_key)


@pytest.fixture
def stranger(api_url: str, sessions: sessionmaker[Session]) -> OpenAI:
    """The same client as another tenant."""
    return OpenAI(base_url=f"{api_url}/v1", api_key=new_tenant(sessions, "stranger").key)


def chat_line(custom_id: str, text: str, *, model: str = "tiny", **body: Any) -> bytes:
    request = {"model": model, "messages": [{"role": "user", "content": text}], **body}
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions"}
    return json.dumps({**line, "body": request}).encode()


def start_batch(
    client: OpenAI, tmp_path: Path, lines: list[bytes], *, window: str = "24h"
) -> Batch:
    """Upload and create, exactly as OpenAI's batch guide does it."""
    path = tmp_path / f"batch-{uuid.uuid4().hex[:6]}.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with path.open("rb") as handle:
        batch_file = client.files.create(file=handle, purpose="batch")
    return client.batches.create(
        input_file_id=batch_file.id,
        endpoint="/v1/chat/completions",
        completion_window=window,  # type: ignore[arg-type]
    )


def poll(client: OpenAI, batch_id: str, until: Callable[[Batch], bool], what: str) -> Batch:
    seen: list[Batch] = []

    def holds() -> bool:
        seen.append(client.batches.retrieve(batch_id))
        return until(seen[-1])

    wait_for(holds, timeout=120, what=what)
    return seen[-1]


def ended(client: OpenAI, batch_id: str) -> Batch:
    return poll(client, batch_id, lambda b: b.status in ENDED, f"batch {batch_id} to end")


def jsonl(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_documented_batch_flow_with_bad_lines(client: OpenAI, tmp_path: Path) -> None:
    schema_format = {"type": "json_schema", "json_schema": {"name": "stock", "schema": SCHEMA}}
    lines = [
        chat_line("a", "Red wool scarf", max_tokens=8),
        chat_line("b", "Green tea mug", max_completion_tokens=8),
        b'{"custom_id": "broken", "method": ',  # malformed JSON
        chat_line("structured", "Blue mug, in stock", max_tokens=64, response_format=schema_format),
        chat_line("a", "again", max_tokens=8),  # duplicate custom_id
        json.dumps(
            {"custom_id": "wrong-url", "method": "POST", "url": "/v1/embeddings", "body": {}}
        ).encode(),
        chat_line("huge", "x" * 200_000),  # over the line limit
        chat_line("nomodel", "hello", model="gpt-4o"),  # not a configured model
        chat_line("streamed", "hello", stream=True),  # a batch line cannot stream
    ]
    batch = start_batch(client, tmp_path, lines)
    assert batch.status == "in_progress" and batch.request_counts is not None
    assert batch.request_counts.total == 9

    batch = ended(client, batch.id)
    assert batch.status == "completed" and batch.completed_at is not None
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 6)

    output = jsonl(client, batch.output_file_id)
    assert [line["custom_id"] for line in output] == ["a", "b", "structured"]
    for line in output:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200 and line["response"]["request_id"]
        completion = ChatCompletion.model_validate(line["response"]["body"])
        assert completion.model == "tiny" and completion.usage is not None
        assert completion.usage.total_tokens == (
            completion.usage.prompt_tokens + completion.usage.completion_tokens
        )
        assert isinstance(completion.choices[0].message.content, str)
    structured = output[2]["response"]["body"]["choices"][0]["message"]["content"]
    assert list(Draft202012Validator(SCHEMA).iter_errors(json.loads(structured))) == []

    errors = jsonl(client, batch.error_file_id)
    ids = [None, "a", "wrong-url", None, "nomodel", "streamed"]
    assert [e["custom_id"] for e in errors] == ids
    assert all(e["response"] is None and e["error"]["code"] == "invalid_request" for e in errors)
    messages = [e["error"]["message"] for e in errors]
    for message, expected in zip(
        messages,
        [
            "line 3: not valid JSON",
            "line 5: duplicate custom_id 'a' (first on line 1)",
            "line 6: url '/v1/embeddings' is not supported",
            "line 7: line is",
            "line 8: unknown model 'gpt-4o'",
            "line 9: body.stream: a batch line cannot stream",
        ],
        strict=True,
    ):
        assert message.startswith(expected), message

    retrieved = client.files.retrieve(batch.output_file_id or "")
    assert retrieved.purpose == "batch_output"
    assert retrieved.bytes == len(client.files.content(retrieved.id).content)
    uploaded = client.files.retrieve(batch.input_file_id)
    assert uploaded.purpose == "batch" and uploaded.filename.endswith(".jsonl")
    assert uploaded.id in [f.id for f in client.files.list()]


def test_chat_completions_create(client: OpenAI) -> None:
    completion = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Say hello"}], max_tokens=8
    )
    assert completion.object == "chat.completion" and completion.model == "tiny"
    choice = completion.choices[0]
    assert isinstance(choice.message.content, str) and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    with pytest.raises(openai.NotFoundError, match="model 'gpt-4o' is not configured"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_chat_completions_structured_output(client: OpenAI) -> None:
    completion = client.chat.completions.create(
        model="scripted",
        messages=[{"role": "user", "content": "Blue mug"}],
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}},
    )
    content = completion.choices[0].message.content
    assert content is not None
    assert list(Draft202012Validator(SCHEMA).iter_errors(json.loads(content))) == []


def test_list_and_cancel_mid_flight(client: OpenAI, tmp_path: Path) -> None:
    lines = [chat_line(f"slow-{i}", f"SLOW item {i}", model="scripted") for i in range(240)]
    batch = start_batch(client, tmp_path, lines)
    assert batch.id in [b.id for b in client.batches.list()]

    poll(client, batch.id, lambda b: bool(b.request_counts and b.request_counts.completed), "work")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    assert cancelling.cancelling_at is not None

    batch = ended(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    counts = batch.request_counts
    assert counts is not None and counts.total == 240
    assert counts.completed + counts.failed == 240 and counts.completed > 0 and counts.failed > 0
    assert len(jsonl(client, batch.output_file_id)) == counts.completed
    errors = jsonl(client, batch.error_file_id)
    assert len(errors) == counts.failed
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}

    finished = ended(
        client, start_batch(client, tmp_path, [chat_line("x", "hi", model="scripted")]).id
    )
    with pytest.raises(openai.BadRequestError, match="is completed; it cannot be cancelled"):
        client.batches.cancel(finished.id)
    paged = [b.id for b in client.batches.list(limit=1)]  # follows the `after` cursor
    assert paged == [finished.id, batch.id]


def test_completion_window_expires_what_did_not_run(client: OpenAI, tmp_path: Path) -> None:
    """`parked` has no worker: nothing runs, so the window closes on every line."""
    lines = [chat_line(f"p{i}", f"item {i}", model="parked") for i in range(3)]
    batch = start_batch(client, tmp_path, lines, window="2s")
    assert batch.status == "in_progress" and batch.expires_at is not None
    assert batch.expires_at - batch.created_at == 2

    batch = ended(client, batch.id)
    assert batch.status == "expired" and batch.expired_at is not None
    assert batch.request_counts is not None and batch.request_counts.failed == 3
    assert batch.output_file_id is None
    errors = jsonl(client, batch.error_file_id)
    assert [e["custom_id"] for e in errors] == ["p0", "p1", "p2"]
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}


def test_other_tenants_see_nothing(client: OpenAI, stranger: OpenAI, tmp_path: Path) -> None:
    batch = ended(
        client, start_batch(client, tmp_path, [chat_line("x", "hi", model="scripted")]).id
    )
    assert batch.status == "completed" and batch.output_file_id is not None
    calls: list[Callable[[], object]] = [
        lambda: stranger.batches.retrieve(batch.id),
        lambda: stranger.batches.cancel(batch.id),
        lambda: stranger.files.retrieve(batch.input_file_id),
        lambda: stranger.files.content(batch.input_file_id),
        lambda: stranger.files.retrieve(batch.output_file_id or ""),
        lambda: stranger.files.content(batch.output_file_id or ""),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError):
            call()
    assert stranger.batches.list().data == [] and stranger.files.list().data == []
    assert client.batches.retrieve(batch.id).status == "completed"


def announce_upload(api_url: str, api_key: str, length: int) -> tuple[int, str]:
    """Send only the headers of an upload of ``length`` bytes: the answer must come before
    the body (no HTTP client sends a Content-Length it does not mean to honour)."""
    url = httpx.URL(api_url)
    conn = http.client.HTTPConnection(url.host, url.port, timeout=30)
    try:
        conn.putrequest("POST", "/v1/files")
        conn.putheader("Authorization", f"Bearer {api_key}")
        conn.putheader("Content-Type", "multipart/form-data; boundary=x")
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_refused_uploads_and_batches(
    client: OpenAI, tmp_path: Path, api_url: str, api_key: str, settings: Settings
) -> None:
    limit = settings.max_upload_bytes
    status, text = announce_upload(api_url, api_key, limit + 1)
    assert status == 413 and f"the limit is {limit}" in text

    path = tmp_path / "tune.jsonl"
    path.write_bytes(chat_line("a", "hi") + b"\n")
    with path.open("rb") as handle, pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=handle, purpose="fine-tune")
    with path.open("rb") as handle:
        good = client.files.create(file=handle, purpose="batch")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(
            input_file_id=good.id, endpoint="/v1/moderations", completion_window="24h"
        )
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(
            input_file_id=good.id,
            endpoint="/v1/chat/completions",
            completion_window="forever",  # type: ignore[arg-type]
        )

    failed = start_batch(client, tmp_path, [b"{nope", chat_line("a", "hi", model="gpt-4o")])
    assert failed.status == "failed" and failed.failed_at is not None
    assert failed.errors is not None and failed.errors.data is not None
    assert [(e.line, e.code) for e in failed.errors.data] == [
        (1, "invalid_request"),
        (2, "invalid_request"),
    ]
    assert failed.request_counts is not None and failed.request_counts.failed == 2
    assert failed.output_file_id is None and failed.error_file_id is None
