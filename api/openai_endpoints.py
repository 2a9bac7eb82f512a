"""The Batch API's endpoints: a line's ``body`` to one native request, a result to its body.

Every line of a batch names the batch's endpoint. A line is one request, so a completions line
takes one prompt (``n`` 1) and an embeddings line one input string; a ``/v1/responses`` line
takes a text ``input`` (or a list of role/content messages) with optional ``instructions``,
runs as a chat, and its output is a ``response`` object with one ``output_text``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from api.openai_completions import Completion, CompletionBody
from api.openai_embeddings import EmbeddingBody, EmbeddingList
from api.openai_schemas import (
    ChatCompletion,
    ChatCompletionBody,
    _Strict,
    content_of,
    describe,
    unix,
)
from core.enums import Priority, TaskKind
from router.config import model_kind_problem
from storage.tables import Request
from submission.prepare import BadRequest
from submission.request import CreateRequest
from submission.services import Services
from tasks.templates import MaxTokens, SamplingIn, Temperature, TopP

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
EMBEDDINGS_URL = "/v1/embeddings"
RESPONSES_URL = "/v1/responses"
TASKS = {
    CHAT_URL: TaskKind.CHAT,
    COMPLETIONS_URL: TaskKind.COMPLETE,
    EMBEDDINGS_URL: TaskKind.EMBED,
    RESPONSES_URL: TaskKind.CHAT,
}


class ResponsesMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str
    type: Literal["message"] | None = None


class ResponsesBody(_Strict):
    """What a text-only Responses request may hold; tools, reasoning and the rest are refused
    (extra fields), so nothing is silently dropped."""

    model: str
    input: str | list[ResponsesMessage] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None  # accepted and ignored
    user: str | None = None

    def to_native(self, priority: Priority) -> CreateRequest:
        turns = (
            [ResponsesMessage(role="user", content=self.input)]
            if isinstance(self.input, str)
            else self.input
        )
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        messages += [
            {"role": "system" if m.role == "developer" else m.role, "content": m.content}
            for m in turns
        ]
        knobs: dict[str, Any] = {
            "max_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }
        return CreateRequest(
            task=TaskKind.CHAT,
            input={"messages": messages},
            params=SamplingIn(**{k: v for k, v in knobs.items() if v is not None}),
            model=self.model,
            priority=priority,
        )


_Parsed = ChatCompletionBody | CompletionBody | EmbeddingBody | ResponsesBody


def line_request(services: Services, endpoint: str, body: dict[str, Any]) -> CreateRequest:
    """A batch line's body as the native request it runs as.

    Raises:
        BadRequest: the body does not fit the endpoint, or asks what a batch line cannot do.
    """
    parsers: dict[str, type[_Parsed]] = {
        CHAT_URL: ChatCompletionBody,
        COMPLETIONS_URL: CompletionBody,
        EMBEDDINGS_URL: EmbeddingBody,
        RESPONSES_URL: ResponsesBody,
    }
    try:
        parsed = parsers[endpoint].model_validate(body)
    except ValidationError as exc:
        raise BadRequest(describe(exc.errors(include_url=False), prefix="body")) from exc
    if getattr(parsed, "stream", None):
        raise BadRequest("body.stream: a batch line cannot stream; leave it out")
    if isinstance(parsed, CompletionBody) and (len(parsed.prompts()) > 1 or parsed.n > 1):
        raise BadRequest("body.prompt: a batch line takes one prompt string and n 1")
    if isinstance(parsed, EmbeddingBody):
        if len(parsed.texts()) > 1:
            raise BadRequest("body.input: a batch line takes one input string")
        if parsed.encoding_format != "float":
            raise BadRequest("body.encoding_format: a batch line answers floats; leave it out")
    spec = services.config.models.get(parsed.model)  # an unknown one is refused when prepared
    if spec is not None:
        problem = model_kind_problem(spec, parsed.model, embedding=endpoint == EMBEDDINGS_URL)
        if problem is not None:
            raise BadRequest(f"body.model: {problem}")
    native: CreateRequest | list[CreateRequest] = parsed.to_native(Priority.BATCH)
    return native[0] if isinstance(native, list) else native


def result_body(endpoint: str, row: Request) -> dict[str, Any]:
    """A succeeded request as the endpoint answers it, for the output file."""
    if endpoint == COMPLETIONS_URL:
        return Completion.of([row]).model_dump(mode="json")
    if endpoint == EMBEDDINGS_URL:
        return EmbeddingList.of([row]).model_dump(mode="json")
    if endpoint == RESPONSES_URL:
        return ResponseObject.of(row).model_dump(mode="json")
    return ChatCompletion.of(row).model_dump(mode="json")


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["completed"] = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete"]
    model: str
    output: list[OutputMessage]
    usage: ResponseUsage
    incomplete_details: dict[str, str] | None = None

    @classmethod
    def of(cls, row: Request) -> ResponseObject:
        prompt, completion = row.prompt_tokens or 0, row.completion_tokens or 0
        cut = row.finish_reason == "length"
        message = OutputMessage(id=f"msg_{row.id.hex}", content=[OutputText(text=content_of(row))])
        return cls(
            id=f"resp_{row.id.hex}",
            created_at=unix(row.created_at) or 0,
            status="incomplete" if cut else "completed",
            model=row.model,
            output=[message],
            usage=ResponseUsage(
                input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion
            ),
            incomplete_details={"reason": "max_output_tokens"} if cut else None,
        )
