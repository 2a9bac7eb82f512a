"""Task kinds: how a kind's input becomes an engine request, and how its output comes back.

Each kind validates its own input (a clear 4xx names the field), renders chat messages plus an
optional output constraint, and turns the engine's text back into the kind's result shape.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from jsonschema import Draft202012Validator, SchemaError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from inferq.enums import TaskKind
from tasks.contract import ChatMessage, EngineRequest


class SamplingIn(BaseModel):
    """Sampling knobs a caller may set, with the OpenAI API's names."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None
    stop: list[str] | None = Field(default=None, max_length=4)
    ignore_eos: bool = False


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


@functools.lru_cache(maxsize=256)
def _schema_problem(canonical: str) -> str | None:
    """Check a schema once: a bulk job's lines share one, and checking costs milliseconds."""
    try:
        Draft202012Validator.check_schema(json.loads(canonical))
    except SchemaError as exc:
        return exc.message
    return None


class ExtractInput(_Input):
    text: str
    schema_: dict[str, Any] = Field(alias="schema")

    _text = field_validator("text")(_non_blank)

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        problem = _schema_problem(json.dumps(schema, sort_keys=True))
        if problem is not None:
            raise ValueError(f"not a valid JSON Schema: {problem}")
        if schema.get("type") != "object":
            raise ValueError('must describe an object ("type": "object")')
        return schema


class ClassifyInput(_Input):
    text: str
    labels: list[str] = Field(min_length=2, max_length=64)

    _text = field_validator("text")(_non_blank)

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, labels: list[str]) -> list[str]:
        if any(not label.strip() for label in labels):
            raise ValueError("labels must not be empty")
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be distinct")
        return labels


class ExpandInput(_Input):
    query: str
    n: int = Field(default=3, ge=1, le=16)

    _query = field_validator("query")(_non_blank)


class ChatInput(_Input):
    messages: list[ChatMessage] = Field(min_length=1)
    # Structured output (the OpenAI API's ``response_format`` with a JSON schema).
    json_schema: dict[str, Any] | None = None

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        problem = None if schema is None else _schema_problem(json.dumps(schema, sort_keys=True))
        if problem is not None:
            raise ValueError(f"not a valid JSON Schema: {problem}")
        return schema

    @model_validator(mode="after")
    def _has_content(self) -> ChatInput:
        if not any(m.content.strip() for m in self.messages):
            raise ValueError("messages must not all be empty")
        return self


class CompleteInput(_Input):
    prompt: str

    _prompt = field_validator("prompt")(_non_blank)


INPUT_MODELS: dict[TaskKind, type[_Input]] = {
    TaskKind.EXTRACT: ExtractInput,
    TaskKind.CLASSIFY: ClassifyInput,
    TaskKind.EXPAND: ExpandInput,
    TaskKind.CHAT: ChatInput,
    TaskKind.COMPLETE: CompleteInput,
}

EXPAND_TEMPERATURE = 0.8
DEFAULT_MAX_TOKENS = {
    TaskKind.EXTRACT: 160,
    TaskKind.CLASSIFY: 16,
    TaskKind.EXPAND: 32,
    TaskKind.CHAT: 64,
    TaskKind.COMPLETE: 64,
}


def _system(text: str) -> ChatMessage:
    return ChatMessage(role="system", content=text)


def _user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def render(task: TaskKind, payload: dict[str, Any], sampling: SamplingIn) -> EngineRequest:
    """Validate a kind's input and render what the engine runs.

    Raises:
        pydantic.ValidationError: the input does not fit the kind; the message names the field.
        ValueError: the input and the sampling parameters contradict each other.
    """
    data = INPUT_MODELS[task].model_validate(payload)
    knobs = sampling.model_dump(exclude={"max_tokens"})
    max_tokens = sampling.max_tokens or DEFAULT_MAX_TOKENS[task]
    if isinstance(data, ExtractInput):
        fields = ", ".join(data.schema_.get("properties", {}))
        messages = [_system(f"Extract these attributes as JSON: {fields}."), _user(data.text)]
        return EngineRequest(
            messages=messages, json_schema=data.schema_, max_tokens=max_tokens, **knobs
        )
    if isinstance(data, ClassifyInput):
        labels = ", ".join(data.labels)
        messages = [_system(f"Answer with one label: {labels}."), _user(data.text)]
        return EngineRequest(messages=messages, choices=data.labels, max_tokens=max_tokens, **knobs)
    if isinstance(data, ExpandInput):
        if data.n > 1 and "temperature" not in sampling.model_fields_set:
            knobs["temperature"] = EXPAND_TEMPERATURE  # greedy decoding gives n equal variants
        if data.n > 1 and knobs["temperature"] == 0:
            raise ValueError("input.n > 1 needs params.temperature > 0 to vary the queries")
        messages = [_system("Rewrite the search query another way."), _user(data.query)]
        return EngineRequest(messages=messages, n=data.n, max_tokens=max_tokens, **knobs)
    if isinstance(data, ChatInput):
        return EngineRequest(
            messages=data.messages, json_schema=data.json_schema, max_tokens=max_tokens, **knobs
        )
    assert isinstance(data, CompleteInput)
    return EngineRequest(prompt=data.prompt, max_tokens=max_tokens, **knobs)


class OutputError(ValueError):
    """The engine's text does not have the shape the task kind promises."""


def parse_output(task: TaskKind, request: EngineRequest, texts: list[str]) -> Any:
    """Turn engine text into the kind's result: an object, a label, variants or text."""
    if task is TaskKind.EXTRACT:
        assert request.json_schema is not None
        try:
            value = json.loads(texts[0])
        except json.JSONDecodeError as exc:
            raise OutputError(f"output is not JSON: {exc}") from exc
        errors = list(Draft202012Validator(request.json_schema).iter_errors(value))
        if errors:
            raise OutputError(f"output does not match the schema: {errors[0].message}")
        return value
    if task is TaskKind.CLASSIFY:
        assert request.choices is not None
        label = texts[0].strip()
        if label not in request.choices:
            raise OutputError(f"output {label!r} is not one of the labels")
        return label
    if task is TaskKind.EXPAND:
        return texts
    # A chat with a JSON schema keeps its text: the chat completion's content is the JSON text.
    return texts[0]
