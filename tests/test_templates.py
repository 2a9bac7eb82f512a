"""Task-kind templates: input validation, the constraint each kind sets, output parsing."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.enums import TaskKind
from tasks.templates import OutputError, SamplingIn, parse_output, render

SCHEMA = {
    "type": "object",
    "properties": {"colour": {"type": "string"}},
    "required": ["colour"],
    "additionalProperties": False,
}


def test_extract_sets_a_json_schema_constraint() -> None:
    request = render(TaskKind.EXTRACT, {"text": "red mug", "schema": SCHEMA}, SamplingIn())
    assert request.json_schema == SCHEMA and request.choices is None
    assert request.messages is not None and request.messages[-1].content == "red mug"
    assert parse_output(TaskKind.EXTRACT, request, ['{"colour": "red"}']) == {"colour": "red"}
    with pytest.raises(OutputError, match="does not match the schema"):
        parse_output(TaskKind.EXTRACT, request, ['{"size": "M"}'])
    with pytest.raises(OutputError, match="not JSON"):
        parse_output(TaskKind.EXTRACT, request, ['{"colour": "re'])


def test_classify_sets_a_choice_constraint() -> None:
    request = render(TaskKind.CLASSIFY, {"text": "x", "labels": ["a", "b"]}, SamplingIn())
    assert request.choices == ["a", "b"]
    assert parse_output(TaskKind.CLASSIFY, request, ["b"]) == "b"
    with pytest.raises(OutputError, match="not one of the labels"):
        parse_output(TaskKind.CLASSIFY, request, ["c"])


def test_expand_asks_for_n_sampled_variants() -> None:
    request = render(TaskKind.EXPAND, {"query": "shoes", "n": 4}, SamplingIn())
    assert request.n == 4 and request.temperature > 0
    assert parse_output(TaskKind.EXPAND, request, ["a", "b", "c", "d"]) == ["a", "b", "c", "d"]


def test_chat_passes_messages_and_sampling_through() -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    request = render(
        TaskKind.CHAT, {"messages": messages}, SamplingIn(max_tokens=7, temperature=0.5, seed=3)
    )
    assert [m.model_dump() for m in request.messages or []] == messages
    assert (request.max_tokens, request.temperature, request.seed) == (7, 0.5, 3)


@pytest.mark.parametrize(
    ("task", "payload", "field"),
    [
        (TaskKind.EXTRACT, {"text": "x", "schema": {"type": 5}}, "schema"),
        (TaskKind.EXTRACT, {"text": "x", "schema": {"type": "array"}}, "schema"),
        (TaskKind.CLASSIFY, {"text": "x", "labels": ["a", "a"]}, "labels"),
        (TaskKind.CHAT, {"messages": [{"role": "robot", "content": "x"}]}, "role"),
        (TaskKind.COMPLETE, {"prompt": "x", "extra": 1}, "extra"),
        (TaskKind.EXPAND, {"query": ""}, "query"),
    ],
)
def test_bad_input_names_the_field(task: TaskKind, payload: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        render(task, payload, SamplingIn())
    assert field in str(info.value)


SEED_MAX = 2**63 - 1  # vLLM and torch hold the seed in a signed 64-bit integer


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"seed": 2**64}, "seed"),
        ({"seed": SEED_MAX + 1}, "seed"),
        ({"seed": -1}, "seed"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_p": float("-inf")}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["a\x00b"]}, "stop"),
        ({"stop": ["x" * 201]}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logprobs": 1}, "logprobs"),
    ],
)
def test_sampling_refuses_what_the_engine_cannot_take(
    params: dict[str, object], field: str
) -> None:
    with pytest.raises(ValidationError) as info:
        SamplingIn.model_validate(params)
    [error] = info.value.errors()
    assert error["loc"][0] == field


def test_sampling_takes_the_edges() -> None:
    knobs = SamplingIn(seed=SEED_MAX, temperature=2, top_p=1, stop=["\n", "x" * 200, "a", "b"])
    assert knobs.seed == SEED_MAX and knobs.stop is not None and len(knobs.stop) == 4
    assert SamplingIn(seed=0).seed == 0
    # JSON as Python's json writes it: NaN is refused there too.
    with pytest.raises(ValidationError, match="temperature"):
        SamplingIn.model_validate_json('{"temperature": NaN}')


def test_stored_params_keep_only_what_was_set() -> None:
    """Rendering again from a row (the reconciler does) gives what the first render gave: an
    expand with no temperature keeps its sampling default rather than a stored 0."""
    first = SamplingIn.model_validate({"seed": 3})
    assert first.stored() == {"seed": 3}
    again = render(TaskKind.EXPAND, {"query": "shoes"}, SamplingIn.model_validate(first.stored()))
    assert again.temperature > 0 and again.seed == 3
