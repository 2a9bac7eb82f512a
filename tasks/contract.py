"""The message a worker receives: everything needed to run a request, JSON-safe.

A worker never reads the database before running; what it needs travels here. On the broker,
one Celery message of task ``inferq.run`` carries a bundle: ``args = [[RunMessage, ...]]``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.enums import Priority, TaskKind

RUN_TASK_NAME = "inferq.run"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class EngineRequest(BaseModel):
    """What an engine runs: a chat or a raw prompt, sampling, and an optional constraint; or,
    with ``embed``, a prompt to turn into one vector."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: list[str] | None = None
    ignore_eos: bool = False
    json_schema: dict[str, Any] | None = None
    choices: list[str] | None = None
    # Pool the prompt into one vector instead of generating (a pooling model; sampling unused).
    embed: bool = False


class RunMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str
    tenant_id: str
    model: str
    task: TaskKind
    priority: Priority
    engine_request: EngineRequest
    enqueued_at: float = Field(description="Unix time the request was committed.")
    job_id: str | None = None
    webhook_url: str | None = None
    # The rest of the route's chain: where the request goes if this model fails or times out.
    fallbacks: list[str] | None = None
    # Which try on this model this is (a failed attempt is retried up to max_attempts).
    attempt: int = 1
    # The client reads tokens as they come (SSE): a continuous engine publishes each step's
    # new text on the request's token stream (see tasks.streams).
    stream: bool = False

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    @classmethod
    def from_wire(cls, payload: dict[str, Any]) -> RunMessage:
        return cls.model_validate(payload)
