"""The one engine protocol. Adapters implement it; nothing else knows which engine runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tasks.contract import EngineRequest


@dataclass(frozen=True, slots=True)
class Generation:
    """What an engine made of one request."""

    texts: list[str]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    # Seconds from the engine call's start to this request's first token, where known.
    ttft_s: float | None = None


class EngineError(RuntimeError):
    """The engine could not run a request or a batch."""


@runtime_checkable
class Engine(Protocol):
    """Runs a batch of requests in one call. Created once per worker process."""

    name: str

    def generate(self, requests: Sequence[EngineRequest]) -> list[Generation]:
        """Run all requests together; one Generation per request, in order.

        Raises:
            EngineError: (or any exception) when the batch as a whole failed; the caller
                splits the batch to isolate the request responsible.
        """
        ...

    def close(self) -> None:
        """Release the engine's memory and threads."""
        ...
