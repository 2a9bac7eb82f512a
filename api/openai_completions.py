"""``POST /v1/completions``: the legacy text completion, over the native ``complete`` kind.

Each prompt (a string or a list of strings) and each of its ``n`` choices is one native
request at interactive priority; the answer waits for all of them and lists their choices in
OpenAI's order (prompt by prompt, then choice by choice). A single prompt with ``n`` 1 can
stream. What inferq does not do (log probabilities, echo, suffix, ``best_of``, token-id
prompts, penalties, logit bias) is refused with a 400 naming the field, never ignored.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from api.committer import GroupCommitter
from api.openai_chat import CHAT_WAIT_S, check_model, submit_all, submit_one, wait_all
from api.openai_schemas import (
    FINISH_REASONS,
    CompletionUsage,
    Stop,
    StreamOptions,
    _Strict,
    content_of,
    finish_reason_of,
    unix,
)
from api.streaming import event, sse
from api.waits import WaitSlots
from core.enums import Priority, RequestStatus, TaskKind
from storage.tables import Request
from submission.request import CreateRequest
from submission.services import Services
from submission.storable import check_storable
from tasks.streams import StreamReader, TokenEvent
from tasks.templates import (
    SEED_MAX,
    MaxTokens,
    SamplingIn,
    Seed,
    Temperature,
    TopP,
)

MAX_CHOICES = 64  # prompts x n in one call: each is a request


class CompletionBody(_Strict):
    model: str
    prompt: str | list[Any]
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: int = Field(default=1, ge=1, le=16)
    seed: Seed | None = None
    stop: Stop = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # Refused unless left at what changes nothing (see _supported).
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, int] | None = None
    user: str | None = None  # accepted and ignored

    @field_validator("prompt")
    @classmethod
    def _texts(cls, prompt: str | list[Any]) -> str | list[Any]:
        items = [prompt] if isinstance(prompt, str) else prompt
        if not items:
            raise ValueError("must not be an empty list")
        if any(not isinstance(item, str) for item in items):
            raise ValueError("token-id prompts are not supported; send text (a string or strings)")
        return prompt

    @model_validator(mode="after")
    def _supported(self) -> CompletionBody:
        refused = {
            "logprobs": self.logprobs is not None,
            "echo": bool(self.echo),
            "suffix": self.suffix is not None,
            "best_of": self.best_of not in (None, 1),
            "frequency_penalty": self.frequency_penalty not in (None, 0),
            "presence_penalty": self.presence_penalty not in (None, 0),
            "logit_bias": bool(self.logit_bias),
        }
        for name, set_ in refused.items():
            if set_:
                raise ValueError(f"{name} is not supported by inferq; leave it out")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        if self.n > 1 and not self.temperature:
            raise ValueError("n > 1 needs temperature > 0, or the choices are all the same")
        if len(self.prompts()) * self.n > MAX_CHOICES:
            raise ValueError(f"prompts x n may be at most {MAX_CHOICES}")
        if self.stream and (len(self.prompts()) > 1 or self.n > 1):
            raise ValueError("stream takes one prompt and n 1")
        check_storable(self.model_dump(exclude_defaults=True))
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def to_native(self, priority: Priority) -> list[CreateRequest]:
        """One native ``complete`` request per prompt and choice; with a seed, choice ``j``
        samples with ``seed + j`` (wrapping past the largest seed) so the choices differ and
        each is reproducible."""
        natives = []
        for prompt in self.prompts():
            for choice in range(self.n):
                knobs: dict[str, Any] = {
                    "max_tokens": self.max_tokens,
                    "temperature": self.temperature,
                    "top_p": self.top_p,
                    "seed": None if self.seed is None else (self.seed + choice) % (SEED_MAX + 1),
                    "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
                }
                params = SamplingIn(**{k: v for k, v in knobs.items() if v is not None})
                natives.append(
                    CreateRequest(
                        task=TaskKind.COMPLETE,
                        input={"prompt": prompt},
                        params=params,
                        model=self.model,
                        priority=priority,
                        stream=bool(self.stream),
                    )
                )
        return natives


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None

    @classmethod
    def of(cls, rows: list[Request], *, n: int = 1) -> Completion:
        """Succeeded ``complete`` requests, ``n`` per prompt; the prompt is counted once."""
        first = rows[0]
        prompt = sum(r.prompt_tokens or 0 for r in rows[::n])
        completion = sum(r.completion_tokens or 0 for r in rows)
        return cls(
            id=f"cmpl-{first.id.hex}",
            created=unix(first.finished_at or first.created_at) or 0,
            model=first.model,
            choices=[
                CompletionChoice(index=i, text=content_of(r), finish_reason=finish_reason_of(r))
                for i, r in enumerate(rows)
            ],
            usage=CompletionUsage(
                prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
            ),
        )


async def complete(
    services: Services,
    committer: GroupCommitter,
    tenant_id: uuid.UUID,
    body: CompletionBody,
    *,
    disconnected: Callable[[], Awaitable[bool]],
    waits: WaitSlots,
) -> Completion:
    """Submit every prompt and choice, then answer once all have succeeded."""
    check_model(services, body.model, embedding=False)
    with waits.hold(tenant_id):
        natives = body.to_native(Priority.INTERACTIVE)
        rows = await submit_all(services, committer, tenant_id, natives)
        rows = await wait_all(services, tenant_id, rows, disconnected)
    return Completion.of(rows, n=body.n)


async def stream(
    services: Services,
    committer: GroupCommitter,
    reader: StreamReader,
    tenant_id: uuid.UUID,
    body: CompletionBody,
) -> AsyncIterator[str]:
    check_model(services, body.model, embedding=False)
    [native] = body.to_native(Priority.INTERACTIVE)
    row = await submit_one(services, committer, tenant_id, native)
    usage = bool(body.stream_options and body.stream_options.include_usage)
    return sse(
        services, reader, row, CompletionChunks(row, include_usage=usage), wait_s=CHAT_WAIT_S
    )


class CompletionChunks:
    """A completion as OpenAI streams it: ``text_completion`` objects with text deltas, one
    with the finish reason, the usage if asked, then ``[DONE]``."""

    def __init__(self, row: Request, *, include_usage: bool) -> None:
        self._row, self._include_usage, self._sent = row, include_usage, ""

    def opening(self) -> list[str]:
        return []

    def update(self, update: TokenEvent | Request) -> list[str]:
        if isinstance(update, Request):
            return self._end(update)
        if update.index != 0:
            return []
        self._sent += update.delta
        return [self._frame([CompletionChoice(text=update.delta, finish_reason=None)])]

    def error(self, message: str, *, code: str = "stream_error") -> list[str]:
        detail = {"message": message, "type": "server_error", "param": None, "code": code}
        return [event(None, json.dumps({"error": detail}))]

    def _end(self, row: Request) -> list[str]:
        if not row.status.terminal:
            return self.error(f"no result within {CHAT_WAIT_S:.0f}s", code="timeout")
        if row.status is not RequestStatus.SUCCEEDED:
            return self.error(
                f"request {row.id} {row.status.value}: {row.error}", code="engine_error"
            )
        self._row = row
        text = content_of(row)
        rest = text[len(self._sent) :] if text.startswith(self._sent) else ""
        reason = row.finish_reason if row.finish_reason in FINISH_REASONS else "stop"
        frames = [self._frame([CompletionChoice(text=rest, finish_reason=reason)])]
        if self._include_usage:
            frames.append(self._frame([], usage=CompletionUsage.of(row)))
        return [*frames, event(None, "[DONE]")]

    def _frame(
        self, choices: list[CompletionChoice], *, usage: CompletionUsage | None = None
    ) -> str:
        row = self._row
        chunk = Completion(
            id=f"cmpl-{row.id.hex}",
            created=unix(row.created_at) or 0,
            model=row.model,
            choices=choices,
            usage=usage,
        )
        return event(None, chunk.model_dump_json())
