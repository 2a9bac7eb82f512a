"""The continuous feed's intake: what the consumer hands over waits here, by priority, until
the engine has room; then it is claimed, a group at a time, and made ready for the engine.

Claiming and the sweep for requests to abort are database round trips; they run on this
thread so the engine thread only steps. At most ``bound`` requests are claimed and not yet
finished (and a few interactive ones beyond), so a worker never claims (marks running) what
another worker could run.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable

from inferq.enums import Outcome, Priority, RequestStatus
from tasks.contract import RunMessage
from workers.batcher import WorkItem

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 0.25  # cancelled or expired requests leave the engine within this
CLAIM_GROUP = 8  # batch requests claimed together while the engine has work ready


class Intake:
    def __init__(
        self,
        *,
        bound: int,
        interactive_extra: int,
        claim: Callable[[list[uuid.UUID], float], set[uuid.UUID]],
        stopped: Callable[[list[uuid.UUID]], dict[uuid.UUID, RequestStatus]],
        in_engine: Callable[[], list[str]],
        wake_engine: Callable[[], None],
        name: str,
    ) -> None:
        self.bound = bound
        self._interactive_extra = interactive_extra
        self._claim = claim
        self._stopped = stopped
        self._in_engine = in_engine
        self._wake_engine = wake_engine
        self._order = itertools.count()
        self._pending: list[tuple[int, int, WorkItem]] = []  # a heap: interactive first, FIFO
        self._cond = threading.Condition()
        self._in_flight = 0  # claimed and not finished
        self.ready: dict[bool, deque[WorkItem]] = {True: deque(), False: deque()}  # interactive?
        self.to_abort: deque[tuple[str, RequestStatus]] = deque()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def submit(self, message: RunMessage) -> WorkItem:
        item = WorkItem(message)
        rank = 0 if message.priority is Priority.INTERACTIVE else 1
        with self._cond:
            heapq.heappush(self._pending, (rank, next(self._order), item))
            self._cond.notify()
        return item

    def left(self, count: int = 1) -> None:
        """``count`` claimed requests left the engine: room for more."""
        with self._cond:
            self._in_flight -= count
            self._cond.notify()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> list[WorkItem]:
        """Stop taking work; return what was received but never claimed."""
        self._stopping.set()
        with self._cond:
            self._cond.notify()
        self._thread.join(10.0)
        with self._cond:
            unclaimed = [item for _, _, item in self._pending]
            self._pending.clear()
        return unclaimed

    def _loop(self) -> None:
        next_sweep = time.monotonic()
        while not self._stopping.is_set():
            taken = self._take(timeout=max(next_sweep - time.monotonic(), 0.0))
            if taken:
                self._admit(taken)
            if time.monotonic() >= next_sweep:
                self._sweep()
                next_sweep = time.monotonic() + SWEEP_INTERVAL_S

    def _take(self, *, timeout: float) -> list[WorkItem]:
        with self._cond:
            if not self._room_for_head():
                self._cond.wait(timeout)
            taken: list[WorkItem] = []
            while self._pending and (taken or self._room_for_head()):
                rank = self._pending[0][0]
                limit = self.bound + (self._interactive_extra if rank == 0 else 0)
                if self._in_flight >= limit:
                    break
                taken.append(heapq.heappop(self._pending)[2])
                self._in_flight += 1
            return taken

    def _room_for_head(self) -> bool:
        """Whether the next pending request may be claimed now: interactive ones at once and
        beyond ``bound`` (the engine keeps slots that only they use); batch ones within it,
        a group at a time while the engine has claimed work ready (a claim is a transaction)."""
        if not self._pending:
            return False
        if self._pending[0][0] == 0:
            return self._in_flight < self.bound + self._interactive_extra
        room = self.bound - self._in_flight
        starving = sum(len(ready) for ready in self.ready.values()) < CLAIM_GROUP
        return room >= CLAIM_GROUP or (room > 0 and starving)

    def _admit(self, items: list[WorkItem]) -> None:
        """Claim the items; settle unrun those no longer open (cancelled, expired, done
        elsewhere) and a second copy of one already claimed (a broker redelivery)."""
        try:
            claimed = self._claim([uuid.UUID(i.message.request_id) for i in items], time.time())
        except Exception as exc:  # the worker is stopping during a database outage
            for item in items:
                item.future.set_exception(exc)
            self.left(len(items))
            return
        unrun = 0
        for item in items:
            request_id = uuid.UUID(item.message.request_id)
            if request_id in claimed:
                claimed.discard(request_id)
                self.ready[item.message.priority is Priority.INTERACTIVE].append(item)
            else:
                item.future.set_result(Outcome.CANCELLED)
                unrun += 1
        if unrun:
            self.left(unrun)
        self._wake_engine()

    def _sweep(self) -> None:
        """Requests in the engine that were cancelled or passed their deadline: abort them."""
        running = self._in_engine()
        if not running:
            return
        try:
            stopped = self._stopped([uuid.UUID(r) for r in running])
        except Exception:  # the database is away; the next sweep tries again
            log.warning("checking %d running requests failed", len(running), exc_info=True)
            return
        for request_id, status in stopped.items():
            self.to_abort.append((str(request_id), status))
        if stopped:
            self._wake_engine()
