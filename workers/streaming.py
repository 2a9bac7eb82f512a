"""Hands token events to the stream publisher on a thread of their own.

The engine thread does no network I/O: it queues each step's new text here and steps on. A
request's ``done`` event is queued once its result is committed (see WorkerRuntime.submit).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence

from tasks.streams import StreamPublisher, TokenEvent

log = logging.getLogger(__name__)

_MAX_EVENTS_PER_CALL = 1000


class TokenRelay:
    def __init__(self, publisher: StreamPublisher, *, name: str = "inferq-tokens") -> None:
        self._publisher = publisher
        self._events: queue.SimpleQueue[TokenEvent | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, events: Sequence[TokenEvent]) -> None:
        for event in events:
            self._events.put(event)

    def stop(self, timeout: float = 5.0) -> None:
        self._events.put(None)
        self._thread.join(timeout)
        self._publisher.close()

    def _loop(self) -> None:
        while (event := self._events.get()) is not None:
            batch = [event]
            stop = False
            while len(batch) < _MAX_EVENTS_PER_CALL:  # one round trip for what is waiting
                try:
                    more = self._events.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            try:
                self._publisher.publish(batch)
            except Exception:  # best effort: the API falls back to the committed record
                log.exception("publishing %d token events failed", len(batch))
            if stop:
                return
