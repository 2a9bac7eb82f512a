"""The continuous feed's intake: what the consumer hands over waits here, by priority, until
the engine has room; then it is claimed, a group at a time, and made ready for the engine.

Claiming and the sweep for requests to abort are database round trips; they run on this
thread so the engine thread only steps. At most ``bound`` requests are claimed and not yet
finished (and a few interactive ones beyond), so a worker never claims (marks running) what
another worker could run. Within a priority, free slots go to tenants in fair turns
(workers.fairness), batch slots also to tenants whose requests wait behind others' in the
broker: those are claimed ahead of their messages.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable

from core.enums import Outcome, Priority, RequestStatus
from tasks.contract import RunMessage
from workers.batcher import WorkItem
from workers.fairness import FairLanes, Pick

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 0.25  # cancelled or expired requests leave the engine within this
CLAIM_GROUP = 8  # batch requests claimed together while the engine has work ready
WAITING_TTL_S = 0.2  # how stale the list of tenants queued on the model may be
WAITING_LIMIT = 1000  # tenants taken into account per turn


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
        waiting: Callable[[Priority, int], set[str]] | None = None,
        claim_ahead: Callable[[Priority, dict[str, int], float], list[WorkItem]] | None = None,
    ) -> None:
        """``waiting`` lists the tenants with requests queued on the model, ``claim_ahead``
        claims tenants' oldest queued requests; without them each tenant is served from what
        this worker holds only."""
        self.bound = bound
        self._interactive_extra = interactive_extra
        self._claim = claim
        self._stopped = stopped
        self._in_engine = in_engine
        self._wake_engine = wake_engine
        self._list_waiting = waiting
        self._claim_ahead = claim_ahead
        self._waiting: set[str] = set()  # batch only: see _refresh_waiting
        self._waiting_at = 0.0
        # Held until claimed, interactive first, each priority in fair turns between tenants.
        self._pending = {Priority.INTERACTIVE: FairLanes(), Priority.BATCH: FairLanes()}
        self._cond = threading.Condition()
        self._in_flight = 0  # claimed and not finished
        self.ready: dict[bool, deque[WorkItem]] = {True: deque(), False: deque()}  # interactive?
        self.to_abort: deque[tuple[str, RequestStatus]] = deque()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def submit(self, message: RunMessage) -> WorkItem:
        item = WorkItem(message)
        with self._cond:
            self._pending[message.priority].push(item)
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
            return [item for lanes in self._pending.values() for item in lanes.drain()]

    def _loop(self) -> None:
        next_sweep = time.monotonic()
        while not self._stopping.is_set():
            self._refresh_waiting()
            taken = self._take(timeout=max(next_sweep - time.monotonic(), 0.0))
            if taken is not None:
                self._admit(*taken)
            if time.monotonic() >= next_sweep:
                self._sweep()
                next_sweep = time.monotonic() + SWEEP_INTERVAL_S

    def _take(self, *, timeout: float) -> tuple[Priority, Pick] | None:
        """Slots for one priority's held requests (interactive first), filled in fair turns."""
        with self._cond:
            if not self._room_for_head():
                self._cond.wait(timeout)
                if not self._room_for_head():
                    return None
            interactive = bool(self._pending[Priority.INTERACTIVE])
            priority = Priority.INTERACTIVE if interactive else Priority.BATCH
            lanes = self._pending[priority]
            room = self.bound + (self._interactive_extra if interactive else 0) - self._in_flight
            waiting = () if interactive else self._waiting
            pick = lanes.pick(min(room, len(lanes)), waiting)
            self._in_flight += len(pick.items) + sum(pick.ahead.values())
            return priority, pick

    def _room_for_head(self) -> bool:
        """Whether held requests may be claimed now: interactive ones at once and beyond
        ``bound`` (the engine keeps slots that only they use); batch ones within it, a group
        at a time while the engine has claimed work ready (a claim is a transaction)."""
        if self._pending[Priority.INTERACTIVE]:
            return self._in_flight < self.bound + self._interactive_extra
        if not self._pending[Priority.BATCH]:
            return False
        room = self.bound - self._in_flight
        starving = sum(len(ready) for ready in self.ready.values()) < CLAIM_GROUP
        return room >= CLAIM_GROUP or (room > 0 and starving)

    def _refresh_waiting(self) -> None:
        """Which tenants have batch work queued on the model, at most every WAITING_TTL_S and
        only while batch work is held (an idle worker does not poll the database)."""
        if self._list_waiting is None or not self._pending[Priority.BATCH]:
            return
        if time.monotonic() - self._waiting_at < WAITING_TTL_S:
            return
        try:
            self._waiting = self._list_waiting(Priority.BATCH, WAITING_LIMIT)
        except Exception:  # the database is away: serve what is held meanwhile
            log.warning("listing the tenants waiting failed", exc_info=True)
            self._waiting = set()
        self._waiting_at = time.monotonic()

    def _admit(self, priority: Priority, pick: Pick) -> None:
        """Claim the picked items; settle unrun those no longer open (cancelled, expired, done
        elsewhere or run ahead of their message) and a second copy of one already claimed (a
        broker redelivery). Then claim the requests picked ahead."""
        items = pick.items
        ids = [uuid.UUID(i.message.request_id) for i in items]
        try:
            claimed = self._claim(ids, time.time()) if ids else set()
        except Exception as exc:  # the worker is stopping during a database outage
            for item in items:
                item.future.set_exception(exc)
            self.left(len(items) + sum(pick.ahead.values()))
            return
        unrun = 0
        lanes = self._pending[priority]
        ready = self.ready[priority is Priority.INTERACTIVE]
        for item in items:
            request_id = uuid.UUID(item.message.request_id)
            if request_id in claimed:
                claimed.discard(request_id)
                ready.append(item)
            else:
                item.future.set_result(Outcome.CANCELLED)
                lanes.refund(item.message.tenant_id)
                unrun += 1
        unrun += self._admit_ahead(priority, pick.ahead)
        if unrun:
            self.left(unrun)
        self._wake_engine()

    def _admit_ahead(self, priority: Priority, ahead: dict[str, int]) -> int:
        """Claim tenants' oldest queued requests ahead of their messages; return how many
        picked slots stay empty. A tenant with fewer than asked has no more to run ahead
        until the list of waiting tenants is read again."""
        if not ahead or self._claim_ahead is None:
            return sum(ahead.values())
        try:
            fresh = self._claim_ahead(priority, ahead, time.time())
        except Exception:  # the database is away: its own messages bring the work later
            log.warning("claiming ahead failed", exc_info=True)
            fresh = []
        self.ready[priority is Priority.INTERACTIVE].extend(fresh)
        got = Counter(item.message.tenant_id for item in fresh)
        for tenant, asked in ahead.items():
            if got[tenant] < asked:
                self._pending[priority].refund(tenant, asked - got[tenant])
                self._waiting.discard(tenant)
        return sum(ahead.values()) - len(fresh)

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
