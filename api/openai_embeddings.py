"""``POST /v1/embeddings``: one vector per input text, from an embedding (pooling) model.

Each input string is one native ``embed`` request at interactive priority, queued, batched
and accounted like any other; the answer waits for all of them. The vector travels back as
the request's output (a list of floats), so ``GET /v1/requests/{id}`` reads it too.
``encoding_format: base64`` answers little-endian float32 bytes in base64 (what the
``openai`` client asks for by default and decodes); ``dimensions`` and token-id inputs are
refused with a 400 naming the field.
"""

from __future__ import annotations

import base64
import struct
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from pydantic import BaseModel, field_validator, model_validator

from api.committer import GroupCommitter
from api.openai_chat import check_model, submit_all, wait_all
from api.openai_schemas import _Strict
from api.waits import WaitSlots
from core.enums import Priority, TaskKind
from storage.tables import Request
from submission.request import CreateRequest
from submission.services import Services
from submission.storable import check_storable

MAX_INPUTS = 256  # strings in one call: each is a request


class EmbeddingBody(_Strict):
    model: str
    input: str | list[Any]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None  # accepted and ignored

    @field_validator("input")
    @classmethod
    def _texts(cls, value: str | list[Any]) -> str | list[Any]:
        items = [value] if isinstance(value, str) else value
        if not items:
            raise ValueError("must not be an empty list")
        if len(items) > MAX_INPUTS:
            raise ValueError(f"takes at most {MAX_INPUTS} strings, not {len(items)}")
        if any(not isinstance(item, str) for item in items):
            raise ValueError("token-id inputs are not supported; send text (a string or strings)")
        if any(not item.strip() for item in items):
            raise ValueError("an input string is empty")
        return value

    @model_validator(mode="after")
    def _supported(self) -> EmbeddingBody:
        if self.dimensions is not None:
            raise ValueError(
                "dimensions is not supported: the model's vectors cannot be shortened; leave it out"
            )
        check_storable(self.model_dump(exclude_defaults=True))
        return self

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

    def to_native(self, priority: Priority) -> list[CreateRequest]:
        return [
            CreateRequest(
                task=TaskKind.EMBED, input={"text": text}, model=self.model, priority=priority
            )
            for text in self.texts()
        ]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage

    @classmethod
    def of(cls, rows: list[Request], *, encoding_format: str = "float") -> EmbeddingList:
        """Succeeded ``embed`` requests, in input order."""
        tokens = sum(r.prompt_tokens or 0 for r in rows)
        data = [
            Embedding(index=i, embedding=encode_vector(r.output, encoding_format))
            for i, r in enumerate(rows)
        ]
        return cls(
            data=data,
            model=rows[0].model,
            usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
        )


def encode_vector(vector: Any, encoding_format: str) -> list[float] | str:
    """A stored vector (a list of floats) as the answer carries it."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return [float(x) for x in vector]


async def embed(
    services: Services,
    committer: GroupCommitter,
    tenant_id: uuid.UUID,
    body: EmbeddingBody,
    *,
    disconnected: Callable[[], Awaitable[bool]],
    waits: WaitSlots,
) -> EmbeddingList:
    """Submit every input, then answer once all have their vectors."""
    check_model(services, body.model, embedding=True)
    with waits.hold(tenant_id):
        natives = body.to_native(Priority.INTERACTIVE)
        rows = await submit_all(services, committer, tenant_id, natives)
        rows = await wait_all(services, tenant_id, rows, disconnected)
    return EmbeddingList.of(rows, encoding_format=body.encoding_format)
