"""The micro-batcher of static engines: buffers requests while the engine runs, and hands
out batches.

Consuming is apart from executing. The consumer step (``workers.consumer``) decodes each
message's bundle into the buffer on the worker's event loop, while a single executor thread
runs the engine (``workers.executor``), so the next batch is already waiting when the current
one ends. Continuous engines are fed by ``workers.feeder`` instead.
"""

from __future__ import annotations

import logging
import math
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
        self._running_since: float | None = None  # monotonic, while a batch runs
        self._typical_s: float | None = None  # how long a batch takes, smoothed
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

    def fetch_in(self, lead_s: float) -> float:
        """Seconds until this engine wants more work (0: now). An engine whose batches take
        longer than ``lead_s`` wants more while it is idle, or from ``lead_s`` before its
        running batch should end, and not while a full batch waits: work fetched long before
        it can start is work an idle worker elsewhere could run, and at a job's end the
        worker holding it would finish a batch later than the rest. A fast engine, or one
        whose first batch runs (its length not known yet), always wants more, within the
        consumer's bound."""
        since, typical = self._running_since, self._typical_s
        if typical is None or typical <= lead_s:
            return 0.0
        if self._buffer.qsize() >= self._max:
            return math.inf  # asked again on the consumer's next look
        if since is None:
            return 0.0
        return max(typical - lead_s - (time.monotonic() - since), 0.0)

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
            self._running_since = started = time.monotonic()
            try:
                self._execute(batch)
            except Exception as exc:  # the executor handles its own errors; this is a bug
                log.exception("batch execution failed")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
            finally:
                took = time.monotonic() - started
                typical = self._typical_s
                self._typical_s = took if typical is None else typical + (took - typical) / 2
                self._running_since = None

    def _take(self) -> list[WorkItem]:
        try:
            first = self._buffer.get(timeout=0.2)
        except queue.Empty:
            return []
        # Busy from here: while the batch fills, the buffer empties, and the engine must
        # not look idle (``fetch_in``) and fetch a bundle it cannot start for a whole batch.
        self._running_since = time.monotonic()
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
