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


class BatchConsumer(bootsteps.ConsumerStep):  # type: ignore[misc]
    """Consume the queues of every model this process runs an engine for: batch queues on
    one channel, interactive queues on another, each channel with its own credit, so an
    interactive request is fetched at once however much batch work is held."""

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self._runtimes: dict[str, WorkerRuntime] = dict(kwargs.get(RUNTIMES_OPTION) or {})
        self._grace: dict[str, float] | None = kwargs.get(DRAIN_OPTION)
        self._credits: list[Credit] = []

    def start(self, c: Any) -> None:
        self._hub = c.controller.hub  # None under a synchronous loop (the memory transport)
        self._acks = _Acks(self._hub)
        self._queues = c.app.amqp.queues
        self._connection = c.connection
        batch = [model_queue(model) for model in self._runtimes]
        report_queues(c, [self._queues[q] for m in batch for q in (m, interactive_queue(m))])
        super().start(c)

    def get_consumers(self, channel: Any) -> list[Consumer]:
        if not self._runtimes:
            return []
        bound = sum(r.buffer_size for r in self._runtimes.values())
        batch = [self._queues[model_queue(model)] for model in self._runtimes]
        interactive = [self._queues[interactive_queue(q.name)] for q in batch]
        return [
            self._consumer(channel, batch, bound),
            self._consumer(self._connection.channel(), interactive, bound),
        ]

    def _consumer(self, channel: Any, queues: list[Queue], bound: int) -> Consumer:
        consumer = Consumer(
            channel,
            queues=queues,
            accept=["json"],
            # Anything else (a pickle) is refused undecoded and dropped, not left to kill
            # the worker and come back to the next one.
            on_decode_error=self._on_decode_error,
            prefetch_count=1,  # then as much as the credit allows
        )
        credit = Credit(bound, partial(_set_prefetch, consumer, self._hub))
        self._credits.append(credit)
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
        credit.took(len(targets))
        settle = _Settle(len(targets), message, self._acks, credit)
        for runtime, run in targets:
            runtime.submit(run).add_done_callback(settle.one_done)

    def stop(self, c: Any) -> None:
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
    counting before that."""

    def __init__(self, bound: int, set_prefetch: Callable[[int], None]) -> None:
        self.bound = bound
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

    def _change(self, requests: int, messages: int) -> None:
        with self._lock:
            self.requests += requests
            self.messages += messages
            prefetch = self.messages + (1 if self.requests < self.bound else 0)
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
        hub.call_soon(partial(consumer.qos, prefetch_count=count))


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
