"""The request body: a task kind, its input and how to run it. The native API takes it as is;
the OpenAI surface, bulk job lines and evaluation replays are turned into it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.enums import Priority, TaskKind
from submission.storable import check_storable
from tasks.templates import SamplingIn


class CreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: TaskKind
    input: dict[str, Any]
    params: SamplingIn = Field(default_factory=SamplingIn)
    model: str | None = None
    priority: Priority = Priority.INTERACTIVE
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    webhook_url: str | None = Field(default=None, max_length=2000)
    deadline_s: float | None = Field(
        default=None,
        gt=0,
        le=7 * 86400,
        description="Seconds from submission by which it must start, else it expires unrun. "
        "A model that would not start it in time hands it down its route's fallback chain at "
        "once (fallback_reason names the deadline).",
    )
    stream: bool = Field(
        default=False,
        description="Publish tokens as they are generated, for GET /v1/requests/{id}/stream.",
    )

    @model_validator(mode="after")
    def _storable(self) -> CreateRequest:
        # NaN in ``input`` is refused, naming the field, where its template reads it; the
        # other fields are typed. NUL goes through both, so it is refused here.
        check_storable(self.model_dump(mode="python", exclude_defaults=True), finite=False)
        return self
