"""Tenants share a model fairly within a priority: who gets a worker's next free slots.

The broker's queue is FIFO, so a job published behind another tenant's 100,000 lines would
wait for all of them. A worker therefore does not run what it holds in arrival order. It
keeps held requests in one lane per tenant and gives each free slot to the tenant served
least so far (start-time fair queueing, a request a unit): a tenant that starts waiting
enters level with the least served one, so time it spent idle earns it no burst later.

A tenant with requests queued on the model but none held here (its messages wait behind
other tenants' in the broker) is served *ahead* of its messages: the intake claims its
oldest queued requests straight from Postgres, with the same conditional claim as any other,
and their messages, when they arrive, find them taken and are acknowledged unrun. So nothing
runs twice, and the broker stays the transport it was: a lost message is still re-sent by the
reconciler, and a worker holds no more than its bound.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field

from workers.batcher import WorkItem


@dataclass(slots=True)
class Pick:
    """What fills the free slots: held requests, and how many to claim ahead, by tenant."""

    items: list[WorkItem] = field(default_factory=list)
    ahead: dict[str, int] = field(default_factory=dict)


class FairLanes:
    """One priority's held requests, a FIFO lane per tenant, and what each tenant was served."""

    def __init__(self) -> None:
        self._lanes: dict[str, deque[WorkItem]] = {}
        self._served: dict[str, int] = {}
        self._last: dict[str, int] = {}  # when each tenant last got a slot: ties go to the older
        self._clock = itertools.count()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, item: WorkItem) -> None:
        self._lanes.setdefault(item.message.tenant_id, deque()).append(item)
        self._size += 1

    def drain(self) -> list[WorkItem]:
        """Everything held, lanes emptied (the worker is stopping)."""
        items = [item for lane in self._lanes.values() for item in lane]
        self._lanes.clear()
        self._size = 0
        return items

    def pick(self, slots: int, waiting: Collection[str] = ()) -> Pick:
        """Fill up to ``slots`` slots, each to the least served tenant: from its lane, or, for
        a tenant in ``waiting`` (queued on the model) with nothing held here, ahead."""
        held = {tenant: len(lane) for tenant, lane in self._lanes.items()}
        active = set(held) | set(waiting)
        self._level(active)
        order = [(self._served[t], self._last[t], t) for t in active]
        heapq.heapify(order)
        pick = Pick()
        while slots and order:
            tenant = heapq.heappop(order)[2]
            if tenant in held:
                if not held[tenant]:
                    continue  # all it has here is taken; the rest waits for its messages
                held[tenant] -= 1
                pick.items.append(self._lanes[tenant].popleft())
            else:
                pick.ahead[tenant] = pick.ahead.get(tenant, 0) + 1
            self._served[tenant] += 1
            self._last[tenant] = next(self._clock)
            heapq.heappush(order, (self._served[tenant], self._last[tenant], tenant))
            slots -= 1
        for tenant, left in held.items():
            if not left:
                del self._lanes[tenant]
        self._size -= len(pick.items)
        return pick

    def refund(self, tenant: str, count: int = 1) -> None:
        """Slots picked for ``tenant`` that ran nothing (taken elsewhere, none queued)."""
        if tenant in self._served:
            self._served[tenant] -= count

    def _level(self, active: set[str]) -> None:
        """Forget tenants that stopped waiting; newcomers start level with the least served."""
        for tenant in [t for t in self._served if t not in active]:
            del self._served[tenant], self._last[tenant]
        floor = min(self._served.values(), default=0)
        for tenant in active - self._served.keys():
            self._served[tenant] = floor
            self._last[tenant] = -1
