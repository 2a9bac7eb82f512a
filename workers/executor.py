"""Runs a batch on the engine and prices it. No network I/O here: results go to the writer."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from inferq.enums import Outcome
from router.config import ModelSpec
from storage.ledger import Attempt
from tasks.templates import OutputError, parse_output
from workers.batcher import WorkItem
from workers.engines.base import Engine, Generation
from workers.writer import BatchWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Ran:
    item: WorkItem
    generation: Generation | None
    error: str | None


class BatchExecutor:
    def __init__(
        self,
        engine: Engine,
        *,
        model: str,
        spec: ModelSpec,
        worker: str,
        writer: BatchWriter,
        claim: Callable[[list[uuid.UUID], float], set[uuid.UUID]],
    ) -> None:
        self._claim = claim
        self._engine = engine
        self._model = model
        self._spec = spec
        self._worker = worker
        self._writer = writer

    def __call__(self, batch: list[WorkItem]) -> None:
        started = time.time()
        claimed = self._claim([uuid.UUID(i.message.request_id) for i in batch], started)
        batch = self._drop_unclaimed(batch, claimed)
        if not batch:
            return
        clock = time.perf_counter()
        ran = self._isolate(batch)
        engine_s = time.perf_counter() - clock
        self._writer.finished(batch, self._attempts(ran, started, engine_s))

    @staticmethod
    def _drop_unclaimed(batch: list[WorkItem], claimed: set[uuid.UUID]) -> list[WorkItem]:
        """Requests no longer open (cancelled, expired, finished) are settled unrun."""
        kept = []
        for item in batch:
            if uuid.UUID(item.message.request_id) in claimed:
                kept.append(item)
            else:
                item.future.set_result(Outcome.CANCELLED)
        return kept

    def _isolate(self, items: Sequence[WorkItem]) -> list[_Ran]:
        """Run items as one call; if the call fails, split it until the culprit fails alone."""
        try:
            generations = self._engine.generate([i.message.engine_request for i in items])
        except Exception as exc:
            if len(items) == 1:
                log.warning("request %s failed: %s", items[0].message.request_id, exc)
                return [_Ran(items[0], None, f"{type(exc).__name__}: {exc}")]
            middle = len(items) // 2
            return self._isolate(items[:middle]) + self._isolate(items[middle:])
        return [_Ran(i, g, None) for i, g in zip(items, generations, strict=True)]

    def _attempts(self, ran: list[_Ran], started: float, engine_s: float) -> list[Attempt]:
        batch_id = uuid.uuid4()
        finished = time.time()
        tokens = [
            (r.generation.prompt_tokens + r.generation.completion_tokens) if r.generation else 0
            for r in ran
        ]
        total_tokens = sum(tokens) or 1
        gpu_seconds_batch = engine_s * self._spec.gpu_count
        attempts = []
        for r, n_tokens in zip(ran, tokens, strict=True):
            message = r.item.message
            output, error = None, r.error
            if r.generation is not None:
                try:
                    output = parse_output(message.task, message.engine_request, r.generation.texts)
                except OutputError as exc:
                    error = str(exc)
            gen = r.generation
            gpu_seconds = gpu_seconds_batch * n_tokens / total_tokens
            ttft = gen.ttft_s if gen else None
            attempts.append(
                Attempt(
                    request_id=uuid.UUID(message.request_id),
                    tenant_id=uuid.UUID(message.tenant_id),
                    task=message.task,
                    model=self._model,
                    engine=self._engine.name,
                    worker=self._worker,
                    batch_id=batch_id,
                    batch_size=len(ran),
                    succeeded=error is None,
                    output=output,
                    error=error,
                    prompt_tokens=gen.prompt_tokens if gen else 0,
                    completion_tokens=gen.completion_tokens if gen else 0,
                    finish_reason=gen.finish_reason if gen else None,
                    queue_wait_s=max(started - message.enqueued_at, 0.0),
                    engine_s=engine_s,
                    ttft_s=ttft,
                    gpu_seconds=gpu_seconds,
                    cost=gpu_seconds * self._spec.price_per_gpu_hour / 3600,
                    started_at=_utc(started),
                    first_token_at=_utc(started + ttft) if ttft is not None else None,
                    finished_at=_utc(finished),
                )
            )
        return attempts


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)
