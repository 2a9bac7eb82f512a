"""The continuous feed: claimed requests enter a running engine between two steps and leave
the moment they finish, each to the writer on its own.

One engine thread owns the engine (vLLM's ``LLMEngine`` is not thread-safe): before each step
it adds what the intake made ready, and aborts what the intake found cancelled or expired and
what ran past the model's ``timeout_s``. Slots: batch work fills up to ``max_batch_size``;
the engine's few extra slots are for interactive requests, which so start at the next step
however full of batch work the engine is; batch work keeps a quarter of the slots however
much interactive traffic there is.

A step that raises aborts everything in the engine. If the engine is not clean afterwards,
or no step returns for ``stall_s`` while it holds requests, the worker stops with a non-zero
exit (``on_wedged``): its supervisor restarts it and the reconciler re-runs its requests. The
requests of a failed step are suspects: they run again one suspect at a time, and a suspect
in a step that fails again fails alone, with the engine's reason. An ``add`` that raises
(instead of refusing) is undone and tried one request at a time, so the request it cannot
take fails alone; anything else the engine thread cannot handle stops the worker the same way.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from core.enums import Outcome, Priority, RequestStatus
from router.config import ModelSpec
from storage.reconcile import DEADLINE_PASSED
from tasks.contract import RunMessage
from tasks.streams import TokenEvent
from workers.attempts import AttemptMaker, Ran
from workers.batcher import WorkItem
from workers.engines.base import Admission, Generation, StepEngine
from workers.intake import Intake
from workers.streaming import TokenRelay
from workers.writer import BatchWriter

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05
_DUE_CHECK_S = 0.25
_STOP_REASONS = {
    RequestStatus.CANCELLED: "cancelled while running",
    RequestStatus.EXPIRED: DEADLINE_PASSED,
}


@dataclass(slots=True)
class _Running:
    item: WorkItem
    added_at: float  # wall time
    clock_mark: float  # the share clock when it entered
    step_mark: int
    suspect: bool = False
    first_token_at: float | None = None

    @property
    def interactive(self) -> bool:
        return self.item.message.priority is Priority.INTERACTIVE


class ContinuousFeeder:
    def __init__(
        self,
        engine: StepEngine,
        *,
        spec: ModelSpec,
        make_attempt: AttemptMaker,
        writer: BatchWriter,
        claim: Callable[[list[uuid.UUID], float], set[uuid.UUID]],
        stopped: Callable[[list[uuid.UUID]], dict[uuid.UUID, RequestStatus]],
        relay: TokenRelay | None,
        stall_s: float,
        on_wedged: Callable[[str], None],
        name: str,
        waiting: Callable[[Priority, int], set[str]] | None = None,
        claim_ahead: Callable[[Priority, dict[str, int], float], list[WorkItem]] | None = None,
    ) -> None:
        self._engine = engine
        self._spec = spec
        self._make_attempt = make_attempt
        self._writer = writer
        self._relay = relay
        self._stall_s = stall_s
        self._on_wedged = on_wedged
        self._batch_slots = min(spec.max_batch_size, engine.slots)
        self._batch_share = max(1, self._batch_slots // 4)
        self._running: dict[str, _Running] = {}
        self._fresh: list[_Running] = []  # added since the last step: it makes their first token
        self._suspects: deque[WorkItem] = deque()
        self._suspected: set[str] = set()
        self._share_clock = 0.0  # engine seconds per request in the engine, summed over steps
        self._steps = 0
        self._step_started: float | None = None  # monotonic, while a step runs
        self._wake = threading.Event()
        self._stopping = threading.Event()
        # Draining (SIGTERM): nothing enters the engine; what runs may until ``_drain_by``
        # (monotonic); what waited, and what is cut short then, is kept for the caller.
        self._drain_by: float | None = None
        self._drained = threading.Event()
        self._handed: list[WorkItem] = []
        self._cut: list[WorkItem] = []
        self.intake = Intake(
            bound=engine.slots + max(4, spec.max_batch_size // 4),
            interactive_extra=max(2, engine.slots - self._batch_slots),
            claim=claim,
            stopped=stopped,
            in_engine=lambda: list(self._running),
            wake_engine=self._wake.set,
            name=f"{name}-intake",
            waiting=waiting,
            claim_ahead=claim_ahead,
        )
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name=f"{name}-watchdog", daemon=True)

    def submit(self, message: RunMessage) -> Future[Outcome]:
        return self.intake.submit(message).future

    def start(self) -> None:
        self.intake.start()
        self._thread.start()
        self._watchdog.start()

    def drain(self, deadline: float) -> tuple[list[WorkItem], list[WorkItem]]:
        """Take no more work; what is in the engine runs on until ``deadline`` (monotonic),
        then is aborted. Returns what was held but never started and what was cut short, with
        their futures pending: the caller hands them back."""
        unclaimed = self.intake.stop()
        self._drain_by = deadline
        self._wake.set()
        if not self._drained.wait(max(deadline - time.monotonic(), 0.0) + 5.0):
            log.error("the engine did not empty by the drain's deadline")
        return unclaimed + self._handed, self._cut

    def stop(self) -> None:
        """Stop; nothing unfinished is acknowledged, so its messages are delivered again."""
        self._stopping.set()
        self._wake.set()
        unclaimed = self.intake.stop()
        self._thread.join(30.0)
        error = RuntimeError("worker stopped before finishing this request")
        leftovers = [r.item for r in self._running.values()] + list(self._suspects)
        leftovers += unclaimed + [i for ready in self.intake.ready.values() for i in ready]
        for item in leftovers:
            if not item.future.done():
                item.future.set_exception(error)

    def progressing(self) -> bool:
        """False while a step has run past ``stall_s``: the worker no longer vouches for
        its requests (their leases lapse) and the watchdog stops it."""
        started = self._step_started
        return started is None or time.monotonic() - started < self._stall_s

    # The engine thread.

    def _loop(self) -> None:
        try:
            self._run()
        except Exception as exc:  # an abort that raised, say: the engine's state is unknown
            log.exception("the engine thread failed")
            self._on_wedged(f"the engine thread failed ({type(exc).__name__}: {exc})")

    def _run(self) -> None:
        next_due_check = time.monotonic()
        while not self._stopping.is_set():
            self._wake.clear()
            if self._drain_by is None:
                self._add_ready()
            else:
                self._drain_step(self._drain_by)
            self._abort_stopped()
            if time.monotonic() >= next_due_check:
                self._abort_overdue()
                next_due_check = time.monotonic() + _DUE_CHECK_S
            if self._running:
                self._step()
            else:
                self._wake.wait(_IDLE_WAIT_S)

    def _drain_step(self, deadline: float) -> None:
        """While draining: what waits to enter is set aside, and at the deadline what still
        runs is aborted and set aside too."""
        for ready in self.intake.ready.values():
            while ready:
                self._handed.append(ready.popleft())
        while self._suspects:
            self._handed.append(self._suspects.popleft())
        if self._running and time.monotonic() >= deadline:
            ids = list(self._running)
            log.warning("drain: %d requests still in the engine at the deadline", len(ids))
            self._engine.abort(ids)
            self._cut += [self._running.pop(rid).item for rid in ids]
            self._fresh.clear()
        if not self._running:
            self._drained.set()

    def _add_ready(self) -> None:
        taken = self._take_ready()
        if not taken:
            return
        admissions = [
            Admission(
                request_id=item.message.request_id,
                request=item.message.engine_request,
                priority=0 if item.message.priority is Priority.INTERACTIVE else 1,
                stream=item.message.stream,
            )
            for item in taken
        ]
        now = time.time()
        refused = []
        for item, error in zip(taken, self._admit(admissions), strict=True):
            if error is None:
                suspect = item.message.request_id in self._suspected
                running = _Running(item, now, self._share_clock, self._steps, suspect)
                self._running[item.message.request_id] = running
                self._fresh.append(running)
            else:  # this request alone: the engine cannot take it
                refused.append((item, error))
        if refused:
            self._finish([self._ran_unstarted(item, error, now) for item, error in refused])

    def _admit(self, admissions: list[Admission]) -> list[str | None]:
        """The engine's answer to each admission. An ``add`` that raises is undone (what
        got in is aborted) and tried one at a time, so only the one it cannot take fails."""
        try:
            return self._engine.add(admissions)
        except Exception as exc:
            self._engine.abort([a.request_id for a in admissions])
            if len(admissions) == 1:
                return [f"{type(exc).__name__}: {exc}"]
            return [error for one in admissions for error in self._admit([one])]

    def _take_ready(self) -> list[WorkItem]:
        """What enters now, within the slot rules (see the module's docstring)."""
        ready = self.intake.ready
        running = len(self._running)
        interactive = sum(1 for r in self._running.values() if r.interactive)
        batch = running - interactive
        taken: list[WorkItem] = []
        if self._suspects and not any(r.suspect for r in self._running.values()):
            taken.append(self._suspects.popleft())
            running += 1
        while ready[True] and running < self._engine.slots:
            if interactive >= self._engine.slots - self._batch_share and ready[False]:
                break
            taken.append(ready[True].popleft())
            running, interactive = running + 1, interactive + 1
        while ready[False] and running < self._engine.slots:
            if running >= self._batch_slots and batch >= self._batch_share:
                break
            taken.append(ready[False].popleft())
            running, batch = running + 1, batch + 1
        return taken

    def _step(self) -> None:
        self._step_started = clock = time.monotonic()
        try:
            outputs = self._engine.step()
        except Exception as exc:
            self._step_started = None
            self._step_failed(exc)
            return
        self._step_started = None
        self._share_clock += (time.monotonic() - clock) / len(self._running)
        self._steps += 1
        now, step_id, size = time.time(), uuid.uuid4(), len(self._running)
        # Slots are free for what was added (the feeder adds no more than the engine runs),
        # so its prefill, and with it its first token, was this step.
        for fresh in self._fresh:
            fresh.first_token_at = fresh.first_token_at or now
        self._fresh.clear()
        events: list[TokenEvent] = []
        finished: list[tuple[WorkItem, Ran]] = []
        for out in outputs:
            running = self._running.get(out.request_id)
            if running is None:
                continue
            if out.deltas:
                events += [TokenEvent(out.request_id, i, text) for i, text in out.deltas]
            if out.finished is not None:
                del self._running[out.request_id]
                finished.append(self._ran(running, out.finished, None, now, step_id, size))
        if events and self._relay is not None:
            self._relay.put(events)
        if finished:
            self._finish(finished)

    def _step_failed(self, exc: Exception) -> None:
        ids = list(self._running)
        log.error("an engine step failed with %d requests in it: %s", len(ids), exc, exc_info=exc)
        try:
            self._engine.abort(ids)
            clean = not self._engine.has_unfinished()
        except Exception:
            log.exception("aborting after a failed step failed")
            clean = False
        if not clean:
            self._on_wedged(f"the engine is not clean after a failed step ({exc})")
        now, reason = time.time(), f"{type(exc).__name__}: {exc}"
        failed = []
        for running in self._running.values():
            if running.suspect:  # failed twice, the second time as the only suspect
                failed.append(self._ran(running, None, reason, now))
            else:
                self._suspected.add(running.item.message.request_id)
                self._suspects.append(running.item)
        self._running.clear()
        self._fresh.clear()
        if failed:
            self._finish(failed)

    def _abort_stopped(self) -> None:
        stopped: dict[str, RequestStatus] = {}
        while self.intake.to_abort:
            request_id, status = self.intake.to_abort.popleft()
            stopped[request_id] = status
        self._abort(
            {rid: (_STOP_REASONS.get(s, "finished elsewhere"), False) for rid, s in stopped.items()}
        )

    def _abort_overdue(self) -> None:
        """A request in the engine longer than the model's ``timeout_s`` times out alone."""
        timeout = self._spec.timeout_s
        if timeout is None:
            return
        cutoff = time.time() - timeout
        reason = f"EngineTimeout: no answer within {timeout:g}s"
        overdue = [rid for rid, r in self._running.items() if r.added_at < cutoff]
        self._abort(dict.fromkeys(overdue, (reason, True)))

    def _abort(self, reasons: dict[str, tuple[str, bool]]) -> None:
        ids = [rid for rid in reasons if rid in self._running]
        if not ids:
            return
        self._engine.abort(ids)
        now = time.time()
        self._finish(
            [
                self._ran(
                    self._running.pop(rid), None, reasons[rid][0], now, timed_out=reasons[rid][1]
                )
                for rid in ids
            ]
        )

    def _ran(
        self,
        running: _Running,
        generation: Generation | None,
        error: str | None,
        now: float,
        step_id: uuid.UUID | None = None,
        size: int | None = None,
        timed_out: bool = False,
    ) -> tuple[WorkItem, Ran]:
        """How a request's run went. Its "batch" is the step it finished in (``step_id``),
        of ``size`` requests in the engine."""
        if generation is None:  # aborted: at most a token a step since it entered
            generation = Generation([], 0, self._steps - running.step_mark, "abort")
        return running.item, Ran(
            message=running.item.message,
            generation=generation,
            error=error,
            started=running.added_at,
            finished=now,
            engine_s=now - running.added_at,
            gpu_seconds=self._share_clock - running.clock_mark,
            batch_id=step_id or uuid.uuid4(),
            batch_size=size or len(self._running) + 1,
            timed_out=timed_out,
            first_token_at=running.first_token_at,
        )

    def _ran_unstarted(self, item: WorkItem, error: str, now: float) -> tuple[WorkItem, Ran]:
        return item, Ran(item.message, None, error, now, now, 0.0, 0.0, uuid.uuid4(), 1)

    def _finish(self, done: list[tuple[WorkItem, Ran]]) -> None:
        for item, _ in done:
            self._suspected.discard(item.message.request_id)
        self._writer.finished([i for i, _ in done], [self._make_attempt(r) for _, r in done])
        self.intake.left(len(done))

    # The watchdog.

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            if not self.progressing():
                self._on_wedged(f"no engine step returned for {self._stall_s:g}s")
                return


def exit_wedged(reason: str) -> None:
    """Stop the worker process at once with a non-zero exit: its engine cannot be trusted."""
    log.critical("the engine is wedged: %s; exiting so the supervisor restarts the worker", reason)
    logging.shutdown()
    os._exit(70)
