"""Streaming: token streams on real Redis, and both SSE surfaces on the running API.

Requests on ``parked`` (no worker serves it) are played by the test itself: it publishes their
tokens, commits their result and publishes ``done``, as a worker would, so what the API sends is
known exactly. Requests on ``tiny`` run on the real vLLM worker.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from openai import OpenAI
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from core.enums import RequestStatus
from core.settings import MEMORY_BROKER, Settings
from storage.tables import Request, utcnow
from tasks.streams import (
    START,
    STREAM_TTL_S,
    StreamPublisher,
    TokenEvent,
    create_publisher,
    create_reader,
    stream_key,
)
from tests.conftest import BROKER_PREFIX, new_tenant, wait_for

CHAT = [{"role": "user", "content": "Tell me a story"}]
Event = tuple[str | None, str]  # an SSE event's name and data


@pytest.fixture
def publisher(settings: Settings) -> Iterator[StreamPublisher]:
    """What a worker holds: the test publishes for requests on ``parked``."""
    created = create_publisher(settings)
    yield created
    created.close()


@pytest.fixture
def openai_client(api_url: str, api_key: str) -> OpenAI:
    return OpenAI(base_url=f"{api_url}/v1", api_key=api_key)


def read_all(settings: Settings, request_id: str, after: str = START) -> list[TokenEvent]:
    async def read() -> list[TokenEvent]:
        reader = create_reader(settings)
        try:
            events, _cursor = await reader.read(request_id, after, block_s=0.1)
            return events
        finally:
            await reader.aclose()

    return asyncio.run(read())


def sse_events(response: httpx.Response) -> Iterator[Event]:
    """Events as they arrive (comment lines skipped)."""
    name: str | None = None
    data: list[str] = []
    for line in response.iter_lines():
        if line.startswith(":"):
            continue
        if line:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
            continue
        if data:
            yield name, "\n".join(data)
        name, data = None, []


def finish(
    sessions: sessionmaker[Session], request_id: uuid.UUID, text: str, *, completion: int = 3
) -> None:
    """Commit a result as a worker's writer does."""
    with sessions.begin() as session:
        session.execute(
            update(Request)
            .where(Request.id == request_id)
            .values(
                status=RequestStatus.SUCCEEDED,
                output=text,
                prompt_tokens=7,
                completion_tokens=completion,
                finish_reason="stop",
                started_at=utcnow(),
                first_token_at=utcnow(),
                finished_at=utcnow(),
            )
        )


def status_of(client: httpx.Client, request_id: str) -> str:
    return str(client.get(f"/v1/requests/{request_id}").json()["status"])


def wait_cancelled(client: httpx.Client, request_id: str, *, timeout: float) -> None:
    wait_for(
        lambda: status_of(client, request_id) == "cancelled",
        timeout=timeout,
        what="the abandoned request to be cancelled",
    )


def submit(client: httpx.Client, model: str, **params: object) -> str:
    body = {"task": "chat", "input": {"messages": CHAT}, "model": model, "stream": True}
    answer = client.post("/v1/requests", json={**body, "params": params})
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


# tasks.streams on real Redis.


def test_events_are_kept_for_readers_that_come_late(settings: Settings) -> None:
    request_id = str(uuid.uuid4())
    publisher = create_publisher(settings)
    try:
        publisher.publish([TokenEvent(request_id, delta="Hel"), TokenEvent(request_id, delta="lo")])
        publisher.publish([TokenEvent(request_id, index=1, delta="é"), TokenEvent(request_id)])
        publisher.publish([TokenEvent(request_id, done=True)])
    finally:
        publisher.close()

    events = read_all(settings, request_id)
    assert events == [
        TokenEvent(request_id, delta="Hel"),
        TokenEvent(request_id, delta="lo"),
        TokenEvent(request_id, index=1, delta="é"),
        TokenEvent(request_id),
        TokenEvent(request_id, done=True),
    ]
    key = stream_key(settings.broker_key_prefix, request_id)
    assert key.startswith(BROKER_PREFIX)
    store = redis.Redis.from_url(settings.broker_url)
    assert store.xlen(key) == 5
    assert 0 < store.ttl(key) <= STREAM_TTL_S


def test_a_read_resumes_from_its_cursor_and_waits_bounded(settings: Settings) -> None:
    request_id = str(uuid.uuid4())
    publisher = create_publisher(settings)

    async def scenario() -> None:
        reader = create_reader(settings)
        try:
            publisher.publish([TokenEvent(request_id, delta="a")])
            first, cursor = await reader.read(request_id, START, block_s=1)
            assert [e.delta for e in first] == ["a"]
            quiet, same = await reader.read(request_id, cursor, block_s=0.05)
            assert (quiet, same) == ([], cursor)
            later = asyncio.get_running_loop().call_later(
                0.2, publisher.publish, [TokenEvent(request_id, delta="b")]
            )
            waited, _ = await reader.read(request_id, cursor, block_s=5)
            later.cancel()
            assert [e.delta for e in waited] == ["b"]
        finally:
            await reader.aclose()
            publisher.close()

    asyncio.run(scenario())


def test_embedded_mode_streams_through_the_process(tmp_path: Path) -> None:
    embedded = Settings(broker_url=MEMORY_BROKER, cache_dir=tmp_path, broker_key_prefix="x:")
    request_id = str(uuid.uuid4())
    create_publisher(embedded).publish(
        [TokenEvent(request_id, delta="hi"), TokenEvent(request_id, done=True)]
    )
    assert read_all(embedded, request_id) == [
        TokenEvent(request_id, delta="hi"),
        TokenEvent(request_id, done=True),
    ]
    assert read_all(embedded, request_id, after="1") == [TokenEvent(request_id, done=True)]


# The API's two surfaces, with the test playing the worker (model ``parked``).


def test_native_stream_sends_tokens_then_the_record(
    client: httpx.Client, publisher: StreamPublisher, sessions: sessionmaker[Session]
) -> None:
    request_id = submit(client, "parked", max_tokens=16)
    publisher.publish([TokenEvent(request_id, delta="Once")])  # before the client listens
    with client.stream("GET", f"/v1/requests/{request_id}/stream") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
        assert next(events) == ("token", json.dumps({"index": 0, "delta": "Once"}))
        publisher.publish([TokenEvent(request_id, delta=" upon")])
        assert next(events) == ("token", json.dumps({"index": 0, "delta": " upon"}))
        finish(sessions, uuid.UUID(request_id), "Once upon")
        publisher.publish([TokenEvent(request_id, done=True)])
        name, data = next(events)
        assert next(events, None) is None
    assert name == "result"
    assert json.loads(data) == client.get(f"/v1/requests/{request_id}").json()
    assert json.loads(data)["output"] == "Once upon"


def test_native_stream_of_another_tenants_request_is_404(
    client: httpx.Client, api_url: str, sessions: sessionmaker[Session]
) -> None:
    request_id = submit(client, "parked", max_tokens=4)
    stranger = httpx.get(
        f"{api_url}/v1/requests/{request_id}/stream",
        headers=new_tenant(sessions, "stranger").headers,
        timeout=10,
    )
    assert stranger.status_code == 404
    assert client.get(f"/v1/requests/{uuid.uuid4()}/stream").status_code == 404


def test_closing_the_stream_cancels_the_request(
    client: httpx.Client, publisher: StreamPublisher
) -> None:
    request_id = submit(client, "parked", max_tokens=16)
    with client.stream("GET", f"/v1/requests/{request_id}/stream") as response:
        publisher.publish([TokenEvent(request_id, delta="Once")])
        assert next(sse_events(response))[0] == "token"
    wait_cancelled(client, request_id, timeout=30)


def test_openai_stream_with_usage(
    openai_client: OpenAI,
    client: httpx.Client,
    publisher: StreamPublisher,
    sessions: sessionmaker[Session],
) -> None:
    stream = openai_client.chat.completions.create(
        model="parked",
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    first = next(stream)  # the role chunk comes at once
    assert first.object == "chat.completion.chunk"
    assert first.choices[0].delta.role == "assistant" and first.usage is None
    request_id = str(uuid.UUID(first.id.removeprefix("chatcmpl-")))
    publisher.publish([TokenEvent(request_id, delta="Once"), TokenEvent(request_id, delta=" up")])
    # The result ends in text the stream never carried (say, a fallback model's): it follows.
    finish(sessions, uuid.UUID(request_id), "Once upon a time", completion=4)
    publisher.publish([TokenEvent(request_id, done=True)])
    chunks = list(stream)

    *content, last, usage = chunks
    assert [c.choices[0].delta.content for c in content] == ["Once", " up", "on a time"]
    assert last.choices[0].finish_reason == "stop" and last.choices[0].delta.content is None
    assert usage.choices == [] and usage.usage is not None
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (7, 4)
    assert {c.id for c in chunks} == {first.id}
    assert status_of(client, request_id) == "succeeded"


def test_openai_stream_ends_without_a_done_event(
    openai_client: OpenAI, publisher: StreamPublisher, sessions: sessionmaker[Session]
) -> None:
    """A lost done event (or an engine that does not stream): the row says it ended."""
    stream = openai_client.chat.completions.create(
        model="parked",
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=16,
        stream=True,
    )
    request_id = uuid.UUID(next(stream).id.removeprefix("chatcmpl-"))
    finish(sessions, request_id, "The end")
    chunks = list(stream)
    assert [c.choices[0].delta.content for c in chunks] == ["The end", None]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_openai_stream_reports_a_failure_as_an_error_event(
    openai_client: OpenAI, sessions: sessionmaker[Session]
) -> None:
    import openai

    stream = openai_client.chat.completions.create(
        model="parked",
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=16,
        stream=True,
    )
    request_id = uuid.UUID(next(stream).id.removeprefix("chatcmpl-"))
    with sessions.begin() as session:
        session.execute(
            update(Request)
            .where(Request.id == request_id)
            .values(status=RequestStatus.FAILED, error="engine fell over", finished_at=utcnow())
        )
    with pytest.raises(openai.APIError, match="engine fell over"):
        list(stream)


def test_stream_options_need_stream(openai_client: OpenAI) -> None:
    import openai

    with pytest.raises(openai.BadRequestError, match="stream_options is only allowed"):
        openai_client.chat.completions.create(
            model="tiny",
            messages=CHAT,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )


# On the real vLLM worker (model ``tiny``).


def test_openai_client_streams_from_vllm(openai_client: OpenAI, client: httpx.Client) -> None:
    stream = openai_client.chat.completions.create(
        model="tiny",
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len(chunks) >= 3  # role, content, finish, usage
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    request_id = chunks[0].id.removeprefix("chatcmpl-")
    record = client.get(f"/v1/requests/{uuid.UUID(request_id)}").json()
    assert record["status"] == "succeeded" and text == record["output"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.completion_tokens == record["usage"]["completion_tokens"] > 0
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] in ("stop", "length")


def test_native_stream_from_vllm(client: httpx.Client) -> None:
    """Needs a worker that streams (RunMessage.stream): tokens come before the record."""
    request_id = submit(client, "tiny", max_tokens=24, ignore_eos=True)
    with client.stream("GET", f"/v1/requests/{request_id}/stream") as response:
        events = list(sse_events(response))
    *tokens, (name, data) = events
    assert name == "result" and tokens and {n for n, _ in tokens} == {"token"}
    record = json.loads(data)
    assert record == client.get(f"/v1/requests/{request_id}").json()
    assert "".join(json.loads(d)["delta"] for _, d in tokens) == record["output"]


def test_closing_a_vllm_stream_aborts_the_request(client: httpx.Client) -> None:
    """Needs a worker that streams: the request is running when its client leaves."""
    request_id = submit(client, "tiny", max_tokens=400, ignore_eos=True)
    with client.stream("GET", f"/v1/requests/{request_id}/stream") as response:
        assert next(sse_events(response))[0] == "token"
    wait_cancelled(client, request_id, timeout=60)


def test_closing_an_openai_stream_cancels_the_request(
    openai_client: OpenAI, client: httpx.Client
) -> None:
    stream = openai_client.chat.completions.create(
        model="tiny",
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=400,
        stream=True,
    )
    request_id = str(uuid.UUID(next(stream).id.removeprefix("chatcmpl-")))
    stream.close()
    wait_cancelled(client, request_id, timeout=60)
