"""Wire shapes of the OpenAI-compatible surface: files, batches and chat completions.

Request bodies forbid what inferq does not do (tools, n > 1), so a caller learns it
from a 400 naming the field instead of from a silently different answer. Response shapes
carry the fields the official client reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from core.enums import Priority, TaskKind
from storage.tables import Request, as_utc
from submission.request import CreateRequest
from submission.storable import check_storable
from tasks.templates import MaxTokens, SamplingIn, Seed, Temperature, TopP, check_stop

FINISH_REASONS = ("stop", "length")


def _checked_stop(stop: str | list[str] | None) -> str | list[str] | None:
    if stop is not None:
        check_stop([stop] if isinstance(stop, str) else stop)
    return stop


# ``stop`` as the OpenAI bodies take it (a string or strings), checked as ours are.
Stop = Annotated[str | list[str] | None, AfterValidator(_checked_stop)]


def unix(value: datetime | None) -> int | None:
    return None if value is None else int(as_utc(value).timestamp())


def describe(errors: Iterable[Any], *, prefix: str) -> str:
    """Pydantic errors as one line: ``body.messages.0.role: Input should be ...``."""
    parts = []
    for err in errors:
        where = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


# Errors, in the OpenAI API's shape (see api.openai_errors).


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


# Every client error of this surface has the OpenAI shape; FastAPI's 422 is answered as 400.
ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {
        "model": ErrorBody,
        "description": "400 invalid input (``param`` names the field), 401 no or a bad key, "
        "404 not found (another tenant's id reads as absent), 413 over the size limit.",
    },
}


# Requests: a chat completion body, in a batch line or posted directly.


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class MessageIn(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def native(self) -> dict[str, str]:
        """The native chat message: ``developer`` is the newer name for ``system``."""
        role = "system" if self.role == "developer" else self.role
        text = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )
        return {"role": role, "content": text}


class JsonSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only with it")
        return self

    def constraint(self) -> dict[str, Any] | None:
        """The output constraint: any JSON object for ``json_object``, the schema for
        ``json_schema``, none for ``text``."""
        if self.type == "json_object":
            return {"type": "object"}
        return self.json_schema.schema_ if self.json_schema is not None else None


class StreamOptions(_Strict):
    include_usage: bool | None = None  # a last chunk with no choices and the usage
    include_obfuscation: bool | None = None  # accepted, ignored: no padding is added


class ChatCompletionBody(_Strict):
    model: str
    messages: list[MessageIn] = Field(min_length=1)
    # The sampling knobs take what the native params take (tasks.templates).
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: Stop = None
    response_format: ResponseFormat | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: Literal[1] | None = None
    user: str | None = None  # accepted and ignored, as are store and metadata
    store: bool | None = None
    metadata: dict[str, str] | None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionBody:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        if (
            self.max_tokens
            and self.max_completion_tokens
            and (self.max_tokens != self.max_completion_tokens)
        ):
            raise ValueError("max_tokens and max_completion_tokens disagree; send one")
        check_storable(self.model_dump(by_alias=True, exclude_defaults=True))
        return self

    def to_native(self, priority: Priority) -> CreateRequest:
        """The native ``chat`` request. Unset sampling keeps inferq's defaults (greedy)."""
        payload: dict[str, Any] = {"messages": [m.native() for m in self.messages]}
        schema = self.response_format.constraint() if self.response_format else None
        if schema is not None:
            payload["json_schema"] = schema
        knobs: dict[str, Any] = {
            "max_tokens": self.max_completion_tokens or self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
        }
        params = SamplingIn(**{k: v for k, v in knobs.items() if v is not None})
        return CreateRequest(
            task=TaskKind.CHAT,
            input=payload,
            params=params,
            model=self.model,
            priority=priority,
            stream=bool(self.stream),
        )


# Responses: chat completions.


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, row: Request) -> CompletionUsage:
        prompt, completion = row.prompt_tokens or 0, row.completion_tokens or 0
        return cls(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    system_fingerprint: str | None = None

    @classmethod
    def of(cls, row: Request) -> ChatCompletion:
        """A succeeded ``chat`` request; with a JSON schema its content is the JSON text."""
        message = AssistantMessage(content=content_of(row))
        return cls(
            id=completion_id(row),
            created=unix(row.finished_at or row.created_at) or 0,
            model=row.model,
            choices=[Choice(message=message, finish_reason=finish_reason_of(row))],
            usage=CompletionUsage.of(row),
        )


def completion_id(row: Request) -> str:
    return f"chatcmpl-{row.id.hex}"


def content_of(row: Request) -> str:
    output = row.output
    return output if isinstance(output, str) else json_text(output)


def finish_reason_of(row: Request) -> str:
    return row.finish_reason if row.finish_reason in FINISH_REASONS else "stop"


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One event of a streamed completion; with ``include_usage`` every chunk has ``usage``
    (null), and the last one has no choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None


def json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# Files and batches.


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class BatchCreate(_Strict):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    # Accepted, not applied: generated files live as long as their batch.
    output_expires_after: dict[str, Any] | None = None


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchErrorItem(BaseModel):
    code: str
    message: str
    line: int | None = None
    param: str | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchErrorItem]


BatchStatus = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None = None
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


def list_ends(data: Sequence[Any]) -> dict[str, str | None]:
    """A list page's ``first_id`` and ``last_id``."""
    return {"first_id": data[0].id if data else None, "last_id": data[-1].id if data else None}
