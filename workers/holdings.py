"""A worker's record of the requests it holds, kept in Redis for the reconciler to take if
the worker dies (see ``tasks.holdings``): what it receives is recorded at once, on a thread
of its own, and the whole set again with every heartbeat."""

from __future__ import annotations

import logging
import threading
import uuid

from celery import Celery

from tasks.holdings import HEARTBEAT_S, beat, leave, redis_client

log = logging.getLogger(__name__)


class Holdings:
    def __init__(self, app: Celery, *, holder: str, heartbeat_s: float = HEARTBEAT_S) -> None:
        self._app = app
        self.holder = f"{holder}/{uuid.uuid4().hex[:8]}"  # unique even if names repeat
        self._heartbeat_s = heartbeat_s
        self._held: set[str] = set()
        self._added: set[str] = set()
        self._removed: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="inferq-holdings", daemon=True)

    @classmethod
    def for_broker(cls, app: Celery, *, holder: str) -> Holdings | None:
        """Holdings for a Redis broker; None for the embedded one (nothing to take over)."""
        with redis_client(app) as client:
            return None if client is None else cls(app, holder=holder)

    def add(self, request_id: str) -> None:
        with self._lock:
            self._held.add(request_id)
            self._added.add(request_id)
            self._removed.discard(request_id)
        self._wake.set()

    def discard(self, request_id: str) -> None:
        with self._lock:
            self._held.discard(request_id)
            self._removed.add(request_id)
            self._added.discard(request_id)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop beating. With nothing held the record goes; else it stays for the
        reconciler, which takes it once the heartbeat is old."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(5.0)
        try:
            with redis_client(self._app) as client:
                if self._flush(client, full=True) == 0:
                    leave(client, self.holder)
        except Exception:
            log.warning("could not update the holdings record at stop", exc_info=True)

    def _loop(self) -> None:
        full = True
        while not self._stopping.is_set():
            try:
                with redis_client(self._app) as client:
                    while not self._stopping.is_set():
                        self._flush(client, full=full)
                        full = not self._wake.wait(self._heartbeat_s)
                        self._wake.clear()
            except Exception:  # Redis is away: beat again once it is back
                log.warning("recording holdings failed", exc_info=True)
                full = True
                self._stopping.wait(self._heartbeat_s)

    def _flush(self, client: object, *, full: bool) -> int:
        """Send what changed (everything held, on a heartbeat); returns how many are held."""
        with self._lock:
            add = set(self._held) if full else self._added
            remove, self._added, self._removed = self._removed, set(), set()
            held = len(self._held)
        try:
            beat(client, self.holder, add=add, remove=remove)
        except Exception:
            with self._lock:  # sent again next time
                self._added |= add - remove
                self._removed |= remove
            raise
        return held
