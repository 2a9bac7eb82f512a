"""One attempt's ledger entry, however it ran: parsed output, price, and where it goes next."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from router.config import ModelSpec
from storage.ledger import Attempt
from tasks.budget import reserved_output
from tasks.contract import RunMessage
from tasks.templates import OutputError, parse_output
from workers.engines.base import Generation
from workers.pricing import price_attempt


@dataclass(frozen=True, slots=True)
class Ran:
    """How one request's run went, timed by whoever ran it (a batch or a continuous feed)."""

    message: RunMessage
    generation: Generation | None
    error: str | None
    started: float  # wall time it entered the engine
    finished: float
    engine_s: float
    gpu_seconds: float  # before multiplying by the model's GPU count
    batch_id: uuid.UUID
    batch_size: int
    timed_out: bool = False
    # Wall time of its first token (the end of its first step in a continuous engine).
    first_token_at: float | None = None


@dataclass(frozen=True, slots=True)
class AttemptMaker:
    model: str
    spec: ModelSpec
    engine: str
    worker: str

    def __call__(self, ran: Ran) -> Attempt:
        message, gen = ran.message, ran.generation
        output, error = None, ran.error
        if gen is not None and error is None:
            try:
                output = parse_output(
                    message.task, message.engine_request, gen.texts, embedding=gen.embedding
                )
            except OutputError as exc:
                error = str(exc)
            except Exception as exc:  # a bug reading one output fails that request, not its batch
                error = f"output could not be read: {type(exc).__name__}: {exc}"
        prompt_tokens = gen.prompt_tokens if gen else 0
        completion_tokens = gen.completion_tokens if gen else 0
        price = price_attempt(
            self.spec,
            gpu_seconds=self.spec.gpu_count * ran.gpu_seconds,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )
        ttft = gen.ttft_s if gen else None
        first_token = ran.first_token_at
        if first_token is None and ttft is not None:
            first_token = ran.started + ttft
        elif ttft is None and first_token is not None:
            ttft = max(first_token - ran.started, 0.0)
        return Attempt(
            request_id=uuid.UUID(message.request_id),
            tenant_id=uuid.UUID(message.tenant_id),
            task=message.task,
            model=self.model,
            engine=self.engine,
            worker=self.worker,
            batch_id=ran.batch_id,
            batch_size=ran.batch_size,
            succeeded=error is None,
            output=output,
            error=error,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=gen.finish_reason if gen else None,
            queue_wait_s=max(ran.started - message.enqueued_at, 0.0),
            engine_s=ran.engine_s,
            ttft_s=ttft,
            gpu_seconds=price.gpu_seconds,
            cost=price.cost,
            started_at=_utc(ran.started),
            first_token_at=_utc(first_token) if first_token is not None else None,
            finished_at=_utc(ran.finished),
            timed_out=ran.timed_out,
            fallbacks=self._next_models(message),
            retry_in_s=self._retry_in(message),
            client_ttft_s=(
                max(first_token - message.enqueued_at, 0.0) if first_token is not None else None
            ),
            reserved_tokens=reserved_output(message.engine_request),
            reserved_at=message.enqueued_at,
        )

    def _next_models(self, message: RunMessage) -> tuple[str, ...]:
        """Where the request goes if this attempt failed: this model again while it has
        tries left, then down the route's chain."""
        chain = tuple(message.fallbacks or ())
        return (self.model, *chain) if message.attempt < self.spec.max_attempts else chain

    def _retry_in(self, message: RunMessage) -> float | None:
        if message.attempt >= self.spec.max_attempts:
            return None
        return float(self.spec.retry_backoff_s * 2 ** (message.attempt - 1))


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)
