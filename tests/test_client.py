"""The Python client's one contract: text, usage, latency and model, whatever engine answers."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import pytest

from inferq.client import ApiError, Client, Latency, RequestFailed, Result, Usage


@pytest.fixture
def inferq(api_url: str, api_key: str) -> Iterator[Client]:
    with Client(api_url, api_key, timeout_s=60) as client:
        yield client


def _shape(result: Result) -> dict[str, str]:
    """Field names and value types: what a caller's code depends on."""
    return {
        field.name: type(getattr(result, field.name)).__name__
        for field in dataclasses.fields(result)
        if field.name not in ("first_model", "fallback_reason")
    } | {"text": type(result.text).__name__}


def test_generate_gives_one_shape_whatever_engine_answers(inferq: Client) -> None:
    prompt = {"messages": [{"role": "user", "content": "say something"}]}
    results = {
        model: inferq.generate("chat", prompt, model=model, params={"max_tokens": 8})
        for model in ("tiny", "scripted")
    }
    assert _shape(results["tiny"]) == _shape(results["scripted"])
    for model, result in results.items():
        assert (result.status, result.model, result.task) == ("succeeded", model, "chat")
        assert isinstance(result.text, str) and result.text == result.output
        assert isinstance(result.usage, Usage) and isinstance(result.latency, Latency)
        usage = result.usage
        assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 8
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        latency = result.latency
        assert latency.total_s is not None and latency.queue_s is not None
        assert 0 <= latency.queue_s <= latency.total_s
    assert results["scripted"].text == "echo say something"


def test_submit_then_wait_matches_get(inferq: Client) -> None:
    request_id = inferq.submit(
        "classify", {"text": "red boots", "labels": ["shoes", "bags"]}, model="scripted"
    )
    done = inferq.wait(request_id, timeout_s=120)
    assert done.done and done.text == "shoes" and done.output == "shoes"
    assert inferq.get(request_id) == done


def test_structured_outputs_come_back_as_json_text(inferq: Client) -> None:
    schema = {
        "type": "object",
        "properties": {"brand": {"type": "string", "maxLength": 8}},
        "required": ["brand"],
        "additionalProperties": False,
    }
    extracted = inferq.generate(
        "extract", {"text": "Acme boots", "schema": schema}, model="scripted"
    )
    assert extracted.output == {"brand": "x"} and json.loads(extracted.text or "") == {"brand": "x"}
    expanded = inferq.generate(
        "expand", {"query": "boots", "n": 2}, model="scripted", params={"temperature": 0.5}
    )
    assert json.loads(expanded.text or "") == expanded.output == ["echo boots", "echo boots"]


def test_a_failed_request_raises_with_its_result(inferq: Client) -> None:
    with pytest.raises(RequestFailed, match="failed: EngineError: poisoned input") as info:
        inferq.generate("complete", {"prompt": "POISON pill"}, model="scripted")
    assert info.value.result.status == "failed" and info.value.result.text is None


def test_refusals_and_timeouts_are_errors(inferq: Client, api_url: str) -> None:
    with pytest.raises(ApiError, match=r"422: .*input\.labels"):
        inferq.submit("classify", {"text": "x", "labels": ["only one"]})
    parked = inferq.submit("complete", {"prompt": "nobody serves this"}, model="parked")
    with pytest.raises(TimeoutError, match="still queued"):
        inferq.wait(parked, timeout_s=0.5)
    with pytest.raises(ApiError, match="no API key"):
        Client(api_url, "")
    with Client(api_url, "wrong") as stranger, pytest.raises(ApiError, match="401"):
        stranger.get(parked)
