"""Runs a batch on the engine and prices it. No network I/O here: results go to the writer."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from inferq.enums import Outcome
from router.config import ModelSpec
from storage.ledger import Attempt
from tasks.contract import EngineRequest
from workers.attempts import AttemptMaker, Ran
from workers.batcher import WorkItem
from workers.engines.base import BatchEngine, EngineError, Generation
from workers.writer import BatchWriter

log = logging.getLogger(__name__)


class EngineTimeout(EngineError):
    """The engine call ran past the model's ``timeout_s``."""


@dataclass(frozen=True, slots=True)
class _Ran:
    item: WorkItem
    generation: Generation | None
    error: str | None
    timed_out: bool = False
    call_s: float = 0.0  # a failed call's own engine time, charged to its requests


class BatchExecutor:
    def __init__(
        self,
        engine: BatchEngine,
        *,
        make_attempt: AttemptMaker,
        spec: ModelSpec,
        writer: BatchWriter,
        claim: Callable[[list[uuid.UUID], float], set[uuid.UUID]],
    ) -> None:
        self._claim = claim
        self._engine = engine
        self._spec = spec
        self._writer = writer
        self._attempt = make_attempt
        # An engine call that ran past timeout_s and may still be running.
        self._abandoned: Future[list[Generation]] | None = None

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
        """Requests no longer open (cancelled, expired, finished) are settled unrun, and so
        is a second copy of a message within the batch (a broker redelivery)."""
        kept = []
        for item in batch:
            request_id = uuid.UUID(item.message.request_id)
            if request_id in claimed:
                kept.append(item)
                claimed.discard(request_id)
            else:
                item.future.set_result(Outcome.CANCELLED)
        return kept

    def _isolate(self, items: Sequence[WorkItem]) -> list[_Ran]:
        """Run items as one call; if the call fails, split it until the culprit fails alone.

        A call past the model's ``timeout_s`` fails every item in it as timed out.
        """
        clock = time.perf_counter()
        try:
            generations = self._generate([i.message.engine_request for i in items])
        except Exception as exc:
            # A timeout is the whole batch's: splitting would only wait on the engine again.
            timed_out = isinstance(exc, EngineTimeout)
            if len(items) == 1 or timed_out:
                ids = ", ".join(i.message.request_id for i in items)
                log.warning("request(s) %s failed: %s", ids, exc)
                error = f"{type(exc).__name__}: {exc}"
                share = (time.perf_counter() - clock) / len(items)
                return [_Ran(item, None, error, timed_out, share) for item in items]
            middle = len(items) // 2
            return self._isolate(items[:middle]) + self._isolate(items[middle:])
        return [_Ran(i, g, None) for i, g in zip(items, generations, strict=True)]

    def _generate(self, requests: list[EngineRequest]) -> list[Generation]:
        """One engine call; with ``timeout_s`` set, on a helper thread that may be given up.

        A call past the timeout is abandoned, not stopped (engines cannot be interrupted), and
        the engine never runs two calls at once: the next call first waits, within its own
        timeout, for the abandoned one. A wedged engine so times out everything after it, the
        breaker cools the model down, and its work goes down the route's chain.
        """
        timeout = self._spec.timeout_s
        if timeout is None:
            return self._engine.generate(requests)
        deadline = time.monotonic() + timeout
        if self._abandoned is not None:
            try:
                self._abandoned.exception(timeout=timeout)
            except TimeoutError as exc:
                raise EngineTimeout(f"engine still busy past {timeout:g}s") from exc
            self._abandoned = None
        box: Future[list[Generation]] = Future()

        def call() -> None:
            try:
                box.set_result(self._engine.generate(requests))
            except BaseException as exc:
                box.set_exception(exc)

        threading.Thread(
            target=call, name=f"inferq-engine-{self._attempt.model}", daemon=True
        ).start()
        try:
            return box.result(timeout=max(deadline - time.monotonic(), 0.0))
        except TimeoutError as exc:
            if box.done():  # the engine's own TimeoutError, raised in time
                raise
            self._abandoned = box
            raise EngineTimeout(f"no answer within {timeout:g}s") from exc

    def _attempts(self, ran: list[_Ran], started: float, engine_s: float) -> list[Attempt]:
        batch_id = uuid.uuid4()
        finished = time.time()
        return [
            self._attempt(
                Ran(
                    message=r.item.message,
                    generation=r.generation,
                    error=r.error,
                    started=started,
                    finished=finished,
                    engine_s=engine_s,
                    gpu_seconds=gpu_seconds,
                    batch_id=batch_id,
                    batch_size=len(ran),
                    timed_out=r.timed_out,
                )
            )
            for r, gpu_seconds in zip(ran, self._gpu_seconds(ran, engine_s), strict=True)
        ]

    def _gpu_seconds(self, ran: list[_Ran], engine_s: float) -> list[float]:
        """A batch's GPU-seconds per request: a failed call's time goes to the requests in
        it (waste, in the ledger), the rest is shared by the others' token counts."""
        tokens = [
            (r.generation.prompt_tokens + r.generation.completion_tokens) if r.generation else 0
            for r in ran
        ]
        failed_s = sum(r.call_s for r in ran if r.generation is None)
        shared_s = max(engine_s - failed_s, 0.0)
        total = sum(tokens) or 1
        return [
            r.call_s if r.generation is None else shared_s * n / total
            for r, n in zip(ran, tokens, strict=True)
        ]
