"""Wire shapes of the OpenAI-compatible surface: files, batches and chat completions.

Request bodies forbid what inferq does not do (tools, streaming, n > 1), so a caller learns it
from a 400 naming the field instead of from a silently different answer. Response shapes
carry the fields the official client reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.schemas import CreateRequest
from inferq.enums import Priority, TaskKind
from storage.models import Request, as_utc
from tasks.templates import SamplingIn

FINISH_REASONS = ("stop", "length")


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


class ChatCompletionBody(_Strict):
    model: str
    messages: list[MessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    response_format: ResponseFormat | None = None
    stream: bool | None = None
    n: Literal[1] | None = None
    user: str | None = None  # accepted and ignored, as are store and metadata
    store: bool | None = None
    metadata: dict[str, str] | None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionBody:
        if self.stream:
            raise ValueError("stream: true is not supported yet; send stream: false")
        if (
            self.max_tokens
            and self.max_completion_tokens
            and (self.max_tokens != self.max_completion_tokens)
        ):
            raise ValueError("max_tokens and max_completion_tokens disagree; send one")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("stop takes at most 4 sequences")
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
            task=TaskKind.CHAT, input=payload, params=params, model=self.model, priority=priority
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
        output = row.output
        content = output if isinstance(output, str) else json_text(output)
        prompt, completion = row.prompt_tokens or 0, row.completion_tokens or 0
        finish = row.finish_reason if row.finish_reason in FINISH_REASONS else "stop"
        return cls(
            id=f"chatcmpl-{row.id.hex}",
            created=unix(row.finished_at or row.created_at) or 0,
            model=row.model,
            choices=[Choice(message=AssistantMessage(content=content), finish_reason=finish)],
            usage=CompletionUsage(
                prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
            ),
        )


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
