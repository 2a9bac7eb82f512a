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
    # An ``embed`` request's vector (a pooling engine); ``texts`` is then empty.
    embedding: list[float] | None = None


class EngineError(RuntimeError):
    """The engine could not run a request or a batch."""


@runtime_checkable
class BatchEngine(Protocol):
    """A static engine: runs a batch of requests in one call (transformers, a hosted API).

    The worker feeds it through the micro-batcher. Created once per worker process.
    """

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


@dataclass(frozen=True, slots=True)
class Admission:
    """A request entering a continuous engine."""

    request_id: str
    request: EngineRequest
    priority: int  # lower runs first
    stream: bool  # report its text at every step


@dataclass(slots=True)
class StepOutput:
    """What one step did for one request: new text (streamed requests only) and, once the
    request is finished, its Generation."""

    request_id: str
    deltas: list[tuple[int, str]]  # (choice index, new text)
    finished: Generation | None = None


@runtime_checkable
class StepEngine(Protocol):
    """A continuous engine (vLLM): requests enter and leave between steps.

    Only the worker's engine thread calls these. Created once per worker process.
    """

    name: str
    # Sequences it runs at once (vLLM's max_num_seqs).
    slots: int

    def add(self, admissions: Sequence[Admission]) -> list[str | None]:
        """Start requests; for each, ``None`` or why the engine refused it (nothing of a
        refused request stays in the engine). One call for many: prompts are encoded together."""
        ...

    def step(self) -> list[StepOutput]:
        """Run one step over what is in the engine; outputs for requests that progressed.

        Raises:
            Exception: the step failed; the caller aborts what is in the engine.
        """
        ...

    def abort(self, request_ids: Sequence[str]) -> None:
        """Remove requests from the engine; unknown or finished ids are ignored."""
        ...

    def has_unfinished(self) -> bool: ...

    def close(self) -> None: ...


# Every engine is one of the two kinds; the worker picks its pipeline by the protocol.
Engine = BatchEngine | StepEngine


def generate_all(engine: Engine, requests: Sequence[EngineRequest]) -> list[Generation]:
    """Run requests to the end on either kind of engine, outside a worker (evaluations,
    benchmarks); one Generation per request, in order.

    Raises:
        EngineError: the engine refused a request.
    """
    if isinstance(engine, BatchEngine):
        return engine.generate(requests)
    ids = [f"run-{i}" for i in range(len(requests))]
    admissions = [
        Admission(i, r, priority=0, stream=False) for i, r in zip(ids, requests, strict=True)
    ]
    refused = [error for error in engine.add(admissions) if error is not None]
    if refused:
        engine.abort(ids)
        raise EngineError(refused[0])
    done: dict[str, Generation] = {}
    while len(done) < len(ids):
        for out in engine.step():
            if out.finished is not None:
                done[out.request_id] = out.finished
    return [done[i] for i in ids]
