"""A Celery consumer step that feeds model queues straight into the micro-batchers.

Celery's own task path costs about a millisecond of Python per message (a request object, a
pool hand-off, events), all of it under the GIL the engine needs. Here a message is decoded,
buffered, and acknowledged from the worker's event loop once its batch is committed: late
acks, with no per-message task machinery. The worker is still a Celery worker (heartbeats,
control commands, Flower), and unacknowledged messages go back to the queue on shutdown or
after the visibility timeout.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Any

from celery import bootsteps
from kombu import Consumer, Message

from inferq.enums import Outcome
from tasks.contract import RUN_TASK_NAME, RunMessage
from tasks.queues import model_queue
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)


class BatchConsumer(bootsteps.ConsumerStep):  # type: ignore[misc]
    """Consume the queue of every model this process runs an engine for."""

    def start(self, c: Any) -> None:
        self._runtimes: dict[str, WorkerRuntime] = dict(c.app.runtimes)
        self._hub = c.controller.hub  # None under a synchronous loop (the memory transport)
        self._queues = c.app.amqp.queues
        super().start(c)

    def get_consumers(self, channel: Any) -> list[Consumer]:
        if not self._runtimes:
            return []
        consumer = Consumer(
            channel,
            queues=[self._queues[model_queue(model)] for model in self._runtimes],
            callbacks=[self._on_message],
            accept=["json"],
            # The buffer: one batch running and the next one filling, per model.
            prefetch_count=sum(r.buffer_size for r in self._runtimes.values()),
        )
        return [consumer]

    def _on_message(self, body: Any, message: Message) -> None:
        try:
            if message.headers.get("task") != RUN_TASK_NAME:
                raise ValueError(f"unexpected task {message.headers.get('task')!r}")
            run = RunMessage.from_wire(body[0][0])
            runtime = self._runtimes[run.model]
        except Exception:
            log.exception("dropping a malformed message")
            message.reject(requeue=False)
            return
        runtime.submit(run).add_done_callback(lambda done: self._settle(done, message))

    def _settle(self, done: Future[Outcome], message: Message) -> None:
        """Runs on the writer thread: acknowledge on the event loop once committed."""
        if done.exception() is not None:
            return  # left unacknowledged: delivered again after a restart or the timeout
        if self._hub is None:
            message.ack()
        else:
            self._hub.call_soon(message.ack)


def serve(app: Any, runtimes: dict[str, WorkerRuntime]) -> None:
    """Make a Celery app's workers feed these runtimes from their models' queues."""
    app.runtimes.update(runtimes)
    app.steps["consumer"].add(BatchConsumer)
