"""Task kinds: how a kind's input becomes an engine request, and how its output comes back.

Each kind validates its own input (a clear 4xx names the field), renders chat messages plus an
optional output constraint, and turns the engine's text back into the kind's result shape.
"""

from __future__ import annotations

import functools
import json
from typing import Annotated, Any

from jsonschema import Draft202012Validator, SchemaError
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from core.enums import TaskKind
from tasks.contract import ChatMessage, EngineRequest
from tasks.schema_guard import (
    SchemaLimits,
    check_chars,
    check_depth,
    load_output,
    output_problem,
    pattern_problem,
)

# What the engine can take, checked before anything is written: vLLM and torch hold the seed
# in a signed 64-bit integer (a larger one wedges the engine: "Overflow when unpacking long
# long"), and NaN or infinite sampling values are not numbers it can sample with. The upper
# bound on max_tokens depends on the model and settings (submission.submit checks it).
SEED_MAX = 2**63 - 1
MAX_STOP = 4
MAX_STOP_CHARS = 200


def check_stop(stop: list[str]) -> list[str]:
    """At most ``MAX_STOP`` sequences, each non-empty, short, and without NUL."""
    if len(stop) > MAX_STOP:
        raise ValueError(f"takes at most {MAX_STOP} sequences, not {len(stop)}")
    for index, text in enumerate(stop):
        if not text:
            raise ValueError(f"sequence {index} is empty")
        if len(text) > MAX_STOP_CHARS:
            raise ValueError(
                f"sequence {index} is {len(text)} characters; the limit is {MAX_STOP_CHARS}"
            )
        if "\x00" in text:
            raise ValueError(f"sequence {index} contains a NUL character")
    return stop


MaxTokens = Annotated[int, Field(ge=1)]
Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
# The Field bounds put the limits in the OpenAPI schema; check_stop also serves the OpenAI
# surface, whose ``stop`` may be one string.
StopList = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
    Field(max_length=MAX_STOP),
    AfterValidator(check_stop),
]


class SamplingIn(BaseModel):
    """Sampling knobs a caller may set, with the OpenAI API's names.

    The field types are shared with the OpenAI surface (``api.openai_schemas``), so both
    refuse the same values with a message naming the field.
    """

    model_config = ConfigDict(extra="forbid")

    max_tokens: MaxTokens | None = None
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    seed: Seed | None = None
    stop: StopList | None = None
    ignore_eos: bool = False

    def stored(self) -> dict[str, Any]:
        """The knobs the caller set, as a row keeps them. Defaults are left out, so rendering
        again from the row (the reconciler, a large job's later chunks) tells a default from
        a choice: an ``expand`` with no temperature gets its sampling default, not 0."""
        return self.model_dump(exclude_unset=True, exclude_none=True)


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def json_text(value: Any) -> str:
    """Canonical JSON text. Python's json reads ``NaN`` and ``Infinity`` from a body, but
    they are not JSON: Postgres refuses them, so they are refused here, naming the field."""
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except ValueError:
        raise ValueError("NaN and Infinity are not JSON numbers") from None


@functools.lru_cache(maxsize=256)
def _schema_problem(canonical: str) -> str | None:
    """Check a schema once: a bulk job's lines share one, and checking costs milliseconds."""
    schema = json.loads(canonical)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        return f"not a valid JSON Schema: {exc.message}"
    return pattern_problem(schema)


def _checked_schema(schema: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
    """A caller's schema, within the limits the API passes in the validation context
    (``{"schema_limits": SchemaLimits}``; none when re-rendering what was accepted)."""
    limits = (info.context or {}).get("schema_limits")
    if isinstance(limits, SchemaLimits):
        check_depth(schema, limits)  # first: measuring it does not recurse, json_text does
    canonical = json_text(schema)
    if isinstance(limits, SchemaLimits):
        check_chars(canonical, limits)
    problem = _schema_problem(canonical)
    if problem is not None:
        raise ValueError(problem)
    return schema


class ExtractInput(_Input):
    text: str
    schema_: dict[str, Any] = Field(alias="schema")

    _text = field_validator("text")(_non_blank)

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, schema: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        _checked_schema(schema, info)
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
    def _valid_schema(
        cls, schema: dict[str, Any] | None, info: ValidationInfo
    ) -> dict[str, Any] | None:
        return None if schema is None else _checked_schema(schema, info)

    @model_validator(mode="after")
    def _has_content(self) -> ChatInput:
        if not any(m.content.strip() for m in self.messages):
            raise ValueError("messages must not all be empty")
        return self


class CompleteInput(_Input):
    prompt: str

    _prompt = field_validator("prompt")(_non_blank)


class EmbedInput(_Input):
    text: str

    _text = field_validator("text")(_non_blank)


INPUT_MODELS: dict[TaskKind, type[_Input]] = {
    TaskKind.EXTRACT: ExtractInput,
    TaskKind.CLASSIFY: ClassifyInput,
    TaskKind.EXPAND: ExpandInput,
    TaskKind.CHAT: ChatInput,
    TaskKind.COMPLETE: CompleteInput,
    TaskKind.EMBED: EmbedInput,
}

EXPAND_TEMPERATURE = 0.8
DEFAULT_MAX_TOKENS = {
    TaskKind.EXTRACT: 160,
    TaskKind.CLASSIFY: 16,
    TaskKind.EXPAND: 32,
    TaskKind.CHAT: 64,
    TaskKind.COMPLETE: 64,
    TaskKind.EMBED: 1,  # nothing is generated; the budget reserves the prompt alone
}


def _system(text: str) -> ChatMessage:
    return ChatMessage(role="system", content=text)


def _user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def render(
    task: TaskKind,
    payload: dict[str, Any],
    sampling: SamplingIn,
    *,
    limits: SchemaLimits | None = None,
) -> EngineRequest:
    """Validate a kind's input and render what the engine runs.

    ``limits`` bound a caller's JSON schema (the API passes the settings'); without them a
    schema is checked for validity and RE2-compatible patterns only.

    Raises:
        pydantic.ValidationError: the input does not fit the kind; the message names the field.
        ValueError: the input and the sampling parameters contradict each other.
    """
    data = INPUT_MODELS[task].model_validate(payload, context={"schema_limits": limits})
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
    if isinstance(data, EmbedInput):
        return EngineRequest(prompt=data.text, max_tokens=1, embed=True)
    assert isinstance(data, CompleteInput)
    return EngineRequest(prompt=data.prompt, max_tokens=max_tokens, **knobs)


class OutputError(ValueError):
    """The engine's text does not have the shape the task kind promises."""


def parse_output(
    task: TaskKind,
    request: EngineRequest,
    texts: list[str],
    *,
    embedding: list[float] | None = None,
) -> Any:
    """Turn engine text into the kind's result: an object, a label, variants, text, or
    (``embed``) the vector a pooling engine made.

    Raises:
        OutputError: for any reason this output cannot be the result (its request alone
            fails; see tasks.schema_guard).
    """
    if task is TaskKind.EXTRACT:
        assert request.json_schema is not None
        try:
            value = load_output(texts[0])
        except ValueError as exc:
            raise OutputError(str(exc)) from None
        problem = output_problem(request.json_schema, value)
        if problem is not None:
            raise OutputError(problem)
        return value
    if task is TaskKind.CLASSIFY:
        assert request.choices is not None
        label = texts[0].strip()
        if label not in request.choices:
            raise OutputError(f"output {label!r} is not one of the labels")
        return label
    if task is TaskKind.EXPAND:
        return texts
    if task is TaskKind.EMBED:
        if not embedding:
            raise OutputError("the engine made no vector: the model is not an embedding model")
        return embedding
    # A chat with a JSON schema keeps its text: the chat completion's content is the JSON text.
    return texts[0]
