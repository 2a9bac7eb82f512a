"""A Celery consumer step that feeds model queues straight into the workers' engines.

Celery's own task path costs about a millisecond of Python per message (a request object, a
pool hand-off, events), all of it under the GIL the engine needs. Here a message (a bundle of
requests, see tasks.contract) is decoded, buffered, and acknowledged from the worker's event
loop once all its requests are committed: late acks, with no per-message task machinery.
The worker is still a Celery worker (heartbeats, control commands, Flower), and
unacknowledged messages go back to the queue on shutdown or after the visibility timeout.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import Any

from celery import Celery, bootsteps
from kombu import Consumer, Message, Queue
from kombu.common import ignore_errors

from core.enums import Outcome
from tasks.contract import RUN_TASK_NAME, RunMessage
from tasks.queues import interactive_queue, model_queue
from workers.batcher import MicroBatcher
from workers.control import report_queues
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)


# The worker option that hands the consumer step the runtimes it feeds, by model:
# ``app.Worker(..., inferq_runtimes={model: runtime})``. Celery passes worker options on to
# every consumer step, so the runtimes reach the step without being kept on the app.
RUNTIMES_OPTION = "inferq_runtimes"
# With it, stopping (SIGTERM) drains: ``{model: grace seconds}`` (see ``workers.drain``).
DRAIN_OPTION = "inferq_drain_grace_s"
COMMIT_S = 30.0  # after the grace, for the last results to commit
# A static engine's next bundle is let in this long before its running batch should end
# (workers.batcher.MicroBatcher.fetch_in); the loop looks again at least this often.
FETCH_LEAD_S = 0.2
REFRESH_S = 0.25


class BatchConsumer(bootsteps.ConsumerStep):  # type: ignore[misc]
    """Consume the queues of every model this process runs an engine for: batch queues on
    one channel, interactive queues on another, each channel with its own credit, so an
    interactive request is fetched at once however much batch work is held."""

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self._runtimes: dict[str, WorkerRuntime] = dict(kwargs.get(RUNTIMES_OPTION) or {})
        self._grace: dict[str, float] | None = kwargs.get(DRAIN_OPTION)
        self._credits: list[Credit] = []
        # The engines fed a batch at a time, whose batch work comes in just in time; only
        # when every engine of this process is one (a continuous engine wants work always).
        static = [r.feed for r in self._runtimes.values() if isinstance(r.feed, MicroBatcher)]
        self._static = static if len(static) == len(self._runtimes) else []
        self._refresher: Any = None
        self._gated: Credit | None = None  # the batch channel's, while work comes just in time

    def start(self, c: Any) -> None:
        self._hub = c.controller.hub  # None under a synchronous loop (the memory transport)
        self._acks = _Acks(self._hub)
        self._queues = c.app.amqp.queues
        self._connection = c.connection
        batch = [model_queue(model) for model in self._runtimes]
        report_queues(c, [self._queues[q] for m in batch for q in (m, interactive_queue(m))])
        super().start(c)
        if self._hub is not None and self._static:
            self._refresh()

    def get_consumers(self, channel: Any) -> list[Consumer]:
        if not self._runtimes:
            return []
        bound = sum(r.buffer_size for r in self._runtimes.values())
        batch = [self._queues[model_queue(model)] for model in self._runtimes]
        interactive = [self._queues[interactive_queue(q.name)] for q in batch]
        # Batch work for static engines comes in just in time (``_wants_more``); interactive
        # work at once.
        just_in_time = self._wants_more if self._hub is not None and self._static else None
        return [
            self._consumer(channel, batch, bound, just_in_time),
            self._consumer(self._connection.channel(), interactive, bound),
        ]

    def _fetch_in(self) -> float:
        """Seconds until an engine of this process wants batch work."""
        return min(feed.fetch_in(FETCH_LEAD_S) for feed in self._static)

    def _wants_more(self) -> bool:
        return self._fetch_in() == 0.0

    def _refresh(self) -> None:
        """On the event loop: let batch work in once it is due, and look again when it
        will be (a timer of the loop's own, so the loop wakes for it). Nothing stops the
        timer but :meth:`stop`: a failed look is logged and tried again."""
        delay = REFRESH_S
        try:
            if self._gated is not None:
                self._gated.refresh()
            due = self._fetch_in()
            delay = min(max(due, 0.005), REFRESH_S) if due > 0 else REFRESH_S
        except Exception:
            log.exception("could not tell whether to fetch more work")
        finally:
            self._refresher = self._hub.call_later(delay, self._refresh)

    def _consumer(
        self,
        channel: Any,
        queues: list[Queue],
        bound: int,
        ready: Callable[[], bool] | None = None,
    ) -> Consumer:
        consumer = Consumer(
            channel,
            queues=queues,
            accept=["json"],
            # Anything else (a pickle) is refused undecoded and dropped, not left to kill
            # the worker and come back to the next one.
            on_decode_error=self._on_decode_error,
            prefetch_count=1,  # then as much as the credit allows
        )
        credit = Credit(bound, partial(_set_prefetch, consumer, self._hub), ready)
        self._credits.append(credit)
        if ready is not None:
            self._gated = credit
        consumer.register_callback(partial(self._on_message, credit))
        return consumer

    def _on_decode_error(self, message: Message, exc: Exception) -> None:
        log.error("dropping a message that is not JSON: %s", exc)
        message.reject(requeue=False)

    def _on_message(self, credit: Credit, body: Any, message: Message) -> None:
        """A message carries a bundle of requests; it is settled once all of them are."""
        try:
            if message.headers.get("task") != RUN_TASK_NAME:
                raise ValueError(f"unexpected task {message.headers.get('task')!r}")
            runs = [RunMessage.from_wire(item) for item in body[0][0]]
            targets = [(self._runtimes[run.model], run) for run in runs]
        except Exception:
            log.exception("dropping a malformed message")
            message.reject(requeue=False)
            return
        settle = _Settle(len(targets), message, self._acks, credit)
        futures = [runtime.submit(run) for runtime, run in targets]
        # Counted once buffered, so whether one more may come sees them waiting.
        credit.took(len(targets))
        for future in futures:
            future.add_done_callback(settle.one_done)

    def stop(self, c: Any) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        # Steps also stop when the broker connection is lost, to start again: drain only
        # when the worker itself stops (warm), not on a cold shutdown.
        closing = c.controller.blueprint.state == bootsteps.CLOSE
        if closing and self._grace is not None and self._runtimes:
            self._drain(c)
        super().stop(c)

    def _drain(self, c: Any) -> None:
        """Runs on the worker's main thread once its event loop has stopped: no more
        messages; engines finish within their grace and hand back the rest; the results
        commit; then this thread acknowledges. What is still unacknowledged after that goes
        back to its queue when the channel closes."""
        assert self._grace is not None
        for consumer in self.consumers or []:
            ignore_errors(c.connection, consumer.cancel)
        started = time.monotonic()
        for model, runtime in self._runtimes.items():
            unstarted, cut = runtime.drain(started + self._grace[model])
            log.info("drain %s: handed back %d unstarted, %d cut short", model, unstarted, cut)
        until = time.monotonic() + COMMIT_S
        while any(credit.requests for credit in self._credits) and time.monotonic() < until:
            self._acks.flush()
            time.sleep(0.05)
        self._acks.flush()
        left = sum(credit.requests for credit in self._credits)
        log.info("drained in %.1fs; %d requests left unsettled", time.monotonic() - started, left)


class _Acks:
    """Messages to acknowledge: on the event loop while it runs; while the worker drains,
    its loop stopped, by the draining thread (:meth:`flush`)."""

    def __init__(self, hub: Any) -> None:
        self._hub = hub
        self._queue: queue.SimpleQueue[Message] = queue.SimpleQueue()

    def put(self, message: Message) -> None:
        if self._hub is None:
            _ack(message)
            return
        self._queue.put(message)
        self._hub.call_soon(self.flush)

    def flush(self) -> None:
        while True:
            try:
                message = self._queue.get_nowait()
            except queue.Empty:
                return
            _ack(message)


class Credit:
    """How many messages the broker may hand over: one more while the requests received and
    not yet finished are under ``bound``. A message is a bundle of up to ``max_batch_size``
    requests, so a fixed prefetch count would hoard what other workers could run; and a
    bundle is acknowledged only when its last request is, so its finished requests stop
    counting before that. With ``ready``, one more comes only while it says so too (and
    :meth:`refresh` asks it again)."""

    def __init__(
        self,
        bound: int,
        set_prefetch: Callable[[int], None],
        ready: Callable[[], bool] | None = None,
    ) -> None:
        self.bound = bound
        self._ready = ready
        self.requests = 0  # received, not finished
        self.messages = 0  # received, not acknowledged
        self._set_prefetch = set_prefetch
        self._prefetch = 1
        self._lock = threading.Lock()

    def took(self, requests: int) -> None:
        self._change(requests, 1)

    def finished(self) -> None:
        """One request of a message finished."""
        self._change(-1, 0)

    def settled(self) -> None:
        """A message was acknowledged (or left for redelivery)."""
        self._change(0, -1)

    def refresh(self) -> None:
        """Ask ``ready`` again."""
        self._change(0, 0)

    def _change(self, requests: int, messages: int) -> None:
        with self._lock:
            self.requests += requests
            self.messages += messages
            room = self.requests < self.bound and (self._ready is None or self._ready())
            prefetch = self.messages + (1 if room else 0)
            prefetch = max(prefetch, 1)
            if prefetch == self._prefetch:
                return
            self._prefetch = prefetch
        self._set_prefetch(prefetch)


def _set_prefetch(consumer: Consumer, hub: Any, count: int) -> None:
    """Change the prefetch count from any thread: on the event loop where there is one."""
    if hub is None:
        consumer.qos(prefetch_count=count)
    else:
        hub.call_soon(partial(_qos, consumer, count))


def _qos(consumer: Consumer, count: int) -> None:
    """On the event loop, where raising would stop it: a channel closed by a lost connection
    is replaced when the consumer starts again, with its own credit."""
    try:
        consumer.qos(prefetch_count=count)
    except Exception:
        log.warning("could not change the prefetch count: the channel is gone", exc_info=True)


class _Settle:
    """Acknowledges a message on the event loop once every request in it is committed."""

    def __init__(self, count: int, message: Message, acks: _Acks, credit: Credit) -> None:
        self._left = count
        self._failed = False
        self._message = message
        self._acks = acks
        self._credit = credit
        self._lock = threading.Lock()

    def one_done(self, done: Future[Outcome]) -> None:
        """Runs on the writer thread."""
        self._credit.finished()
        with self._lock:
            self._failed |= done.exception() is not None
            self._left -= 1
            if self._left:
                return
        self._credit.settled()
        if self._failed:
            return  # left unacknowledged: delivered again later
        self._acks.put(self._message)


def _ack(message: Message) -> None:
    """Acknowledge, unless the connection it came on was lost meanwhile (Redis restarted): it
    cannot be acknowledged then, and raising here would stop the worker's event loop. Its
    request is committed; a redelivered copy is settled unrun."""
    try:
        message.ack()
    except Exception:
        log.warning("could not acknowledge a message: its connection is gone", exc_info=True)


def serve(
    app: Celery, runtimes: dict[str, WorkerRuntime], *, drain: dict[str, float] | None = None
) -> dict[str, Any]:
    """Make the app's workers feed these runtimes from their models' queues; returns the
    options to start the worker with (``app.Worker(..., **serve(app, runtimes))``). With
    ``drain`` (grace seconds by model), stopping drains (``workers.drain``)."""
    app.steps["consumer"].add(BatchConsumer)
    return {RUNTIMES_OPTION: dict(runtimes), DRAIN_OPTION: drain}
