"""The micro-batcher of static engines: buffers requests while the engine runs, and hands
out batches.

Consuming is apart from executing. The consumer step (``workers.consumer``) decodes each
message's bundle into the buffer on the worker's event loop, while a single executor thread
runs the engine (``workers.executor``), so the next batch is already waiting when the current
one ends. Continuous engines are fed by ``workers.feeder`` instead.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from core.enums import Outcome
from tasks.contract import RunMessage

log = logging.getLogger(__name__)


@dataclass(slots=True)
class WorkItem:
    message: RunMessage
    received_at: float = field(default_factory=time.time)
    future: Future[Outcome] = field(default_factory=Future)


class MicroBatcher:
    """Collect up to ``max_batch_size`` items, or what arrives within ``window_s`` of the
    first, and pass them to ``execute`` on one executor thread."""

    def __init__(
        self,
        execute: Callable[[list[WorkItem]], None],
        *,
        max_batch_size: int,
        window_s: float,
        name: str = "inferq-executor",
    ) -> None:
        self._execute = execute
        self._max = max_batch_size
        self._window_s = window_s
        self._buffer: queue.SimpleQueue[WorkItem] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._current: list[WorkItem] = []  # the batch the executor runs
        self._untaken: list[WorkItem] = []  # taken from the buffer as the batcher stopped
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def submit(self, message: RunMessage) -> Future[Outcome]:
        if self._stopping.is_set():
            raise RuntimeError("the batcher is stopping")
        item = WorkItem(message)
        self._buffer.put(item)
        return item.future

    def start(self) -> None:
        self._thread.start()

    def drain(self, deadline: float) -> tuple[list[WorkItem], list[WorkItem]]:
        """Take no more batches; the one running may finish until ``deadline`` (monotonic).
        Returns what was buffered and never started, and the running batch if it had not
        finished by then, with their futures pending: the caller hands them back."""
        self._stopping.set()
        self._thread.join(max(deadline - time.monotonic(), 0.0))
        running = self._current if self._thread.is_alive() else []  # else with the writer
        cut = [item for item in running if not item.future.done()]
        if cut:
            log.warning("drain: a batch of %d was still running at the deadline", len(cut))
        return self._untaken + self._take_buffered(), cut

    def _take_buffered(self) -> list[WorkItem]:
        items = []
        while True:
            try:
                items.append(self._buffer.get_nowait())
            except queue.Empty:
                return items

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._thread.join(timeout)
        # Nothing buffered is run any more; its messages stay unacknowledged.
        for item in self._untaken + self._take_buffered():
            if not item.future.done():
                item.future.set_exception(
                    RuntimeError("worker stopped before running this request")
                )

    def _loop(self) -> None:
        while not self._stopping.is_set():
            batch = self._take()
            if not batch:
                continue
            if self._stopping.is_set():
                self._untaken = batch
                return
            self._current = batch
            try:
                self._execute(batch)
            except Exception as exc:  # the executor handles its own errors; this is a bug
                log.exception("batch execution failed")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)

    def _take(self) -> list[WorkItem]:
        try:
            first = self._buffer.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self._window_s
        while len(batch) < self._max:
            remaining = deadline - time.monotonic()
            try:
                # What is already buffered is taken at once; only an empty buffer waits.
                batch.append(self._buffer.get(timeout=max(remaining, 0.0)))
            except queue.Empty:
                break
        return batch
