"""Runs a batch on the engine and prices it. No network I/O here: results go to the writer.

A static engine keeps nothing between calls, so after a call that raised it is clean: the
batch is split until the request responsible fails alone. A call past the model's
``timeout_s`` fails its batch as timed out and is abandoned, still running; if it has not
returned ``stall_s`` later the engine is wedged, and the worker stops with a non-zero exit
(``on_wedged``) so its supervisor restarts it, as the continuous feed does for a step.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from core.enums import Outcome
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
        stall_s: float = 60.0,
        on_wedged: Callable[[str], None] | None = None,
    ) -> None:
        self._claim = claim
        self._engine = engine
        self._spec = spec
        self._writer = writer
        self._attempt = make_attempt
        self._stall_s = stall_s
        self._on_wedged = on_wedged
        # An engine call that ran past timeout_s and may still be running, and since when
        # (monotonic); a timer calls on_wedged if it is still running stall_s later.
        self._abandoned: Future[list[Generation]] | None = None
        self._abandoned_at = 0.0
        self._watchdog: threading.Timer | None = None

    def progressing(self) -> bool:
        """False once an abandoned call has run ``stall_s`` past its timeout: the worker no
        longer vouches for its requests (their leases lapse) and the watchdog stops it."""
        box = self._abandoned
        stalled = time.monotonic() - self._abandoned_at >= self._stall_s
        return box is None or box.done() or not stalled

    def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _abandon(self, box: Future[list[Generation]]) -> None:
        self._abandoned, self._abandoned_at = box, time.monotonic()
        if self._on_wedged is None:
            return
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = threading.Timer(self._stall_s, self._check_abandoned, args=(box,))
        self._watchdog.daemon = True
        self._watchdog.start()

    def _check_abandoned(self, box: Future[list[Generation]]) -> None:
        if not box.done() and self._on_wedged is not None:
            timeout = self._spec.timeout_s
            self._on_wedged(
                f"an engine call ran past timeout_s ({timeout:g}s) and had not returned "
                f"{self._stall_s:g}s later"
            )

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
            self._abandon(box)
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
