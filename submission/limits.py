"""Backpressure: refuse work with 429 and ``Retry-After`` before anything is written.

Every path that creates requests passes here: single requests and chat completions, inline
jobs and batches, and each chunk the background admission inserts (which waits and tries
again instead of answering 429). Four limits, each cheap to check:

* a model's queue: at most ``max_queued_per_model`` requests waiting (counted in Postgres, one
  grouped query a second), so a model that cannot keep up pushes back instead of growing
  latency without bound. Interactive requests count only the interactive ones waiting: they
  run ahead of bulk work, so one tenant's large job never turns another's request into a 429;
  bulk work counts everything waiting;
* a tenant's requests in flight (queued or running): at most ``max_inflight_per_tenant``;
* a tenant's tokens per minute: at most ``tenant_tokens_per_minute`` (0: no limit), prompt
  tokens plus the most the request may generate (``max_tokens`` x n), reserved here and
  settled by the worker when it finishes (``tasks.budget``). If Redis is unreachable this limit
  is not enforced (the API keeps accepting; see DESIGN.md);
* a tenant's spending budget per day and month, where it has one: the worst-case cost of what
  is admitted is reserved on its rows and settled by its ledger rows (``submission.spend``).

It also estimates when a model would start a request with a deadline
(``submission.deadlines``), so routing can hand the request down the chain in time.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol, TypeVar

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.enums import OPEN_STATUSES, Priority, RequestStatus
from core.settings import Settings
from router import Route, RouterConfig
from storage.tables import Request
from submission.deadlines import StartEstimator, escalate
from submission.spend import Spend
from tasks.budget import WINDOW_S, MemoryCounter, RedisCounter, TokenBudget, reserved_output
from tasks.contract import EngineRequest

__all__ = ["Limits", "MemoryCounter", "RedisCounter", "TooBusy"]

log = logging.getLogger(__name__)

_CACHE_S = 1.0
Depths = dict[tuple[str, Priority], int]  # requests waiting, by model and priority


class TooBusy(Exception):
    """A limit is reached; the message names it, ``retry_after`` says when to try again."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Body(Protocol):
    @property
    def priority(self) -> Priority: ...


class _Sized(Protocol):
    @property
    def tenant_id(self) -> uuid.UUID: ...
    @property
    def model(self) -> str: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def body(self) -> _Body: ...
    @property
    def engine_request(self) -> EngineRequest: ...
    @property
    def reserved_cost(self) -> float | None: ...


Item = TypeVar("Item", bound=_Sized)


def cost(item: _Sized) -> int:
    """The tokens a request may use: its prompt and the most it may generate."""
    return item.prompt_tokens + reserved_output(item.engine_request)


class Limits:
    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], budget: TokenBudget
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._budget = budget
        self._lock = threading.Lock()
        self._depths: tuple[float, Depths] = (0.0, {})
        self._inflight: dict[uuid.UUID, tuple[float, int]] = {}
        self.spend = Spend(sessions)
        self.starts = StartEstimator(sessions)

    @classmethod
    def create(cls, settings: Settings, sessions: sessionmaker[Session]) -> Limits:
        return cls(settings, sessions, TokenBudget.create(settings))

    def room(self, tenant: uuid.UUID) -> int:
        """How many more requests the tenant may have in flight now."""
        return max(self._settings.max_inflight_per_tenant - self._tenant_inflight(tenant), 0)

    def over_budget(self, item: _Sized) -> str | None:
        """Why ``item`` alone can never fit the tenant's tokens per minute or spending
        budget, or None."""
        limit = self._settings.tenant_tokens_per_minute
        if limit and cost(item) > limit:
            return (
                f"the request may use {cost(item)} tokens (prompt {item.prompt_tokens} + "
                f"max_tokens x n); the limit is {limit} tokens a minute"
            )
        if item.reserved_cost:
            return self.spend.too_costly(item.tenant_id, item.reserved_cost)
        return None

    def in_time(self, chosen: Route, *, deadline_s: float | None, priority: Priority) -> Route:
        """``chosen``, moved down its chain past models that would start it after its
        deadline (unchanged without a deadline)."""
        if deadline_s is None or not chosen.fallbacks:
            return chosen
        return escalate(chosen, lambda model: self.starts.late(model, priority, deadline_s))

    def priced(self, item: Item, config: RouterConfig) -> Item:
        """``item`` with its worst-case cost, if its tenant has a budget to reserve it from."""
        if not self.spend.budgeted(item.tenant_id):
            return item
        worst = self.spend.worst_cost(
            config.models[item.model],
            item.model,
            prompt=item.prompt_tokens,
            output=reserved_output(item.engine_request),
        )
        return replace(item, reserved_cost=worst)  # type: ignore[type-var]

    def admit(self, items: Sequence[_Sized]) -> None:
        """Raise :class:`TooBusy` if taking ``items`` now would break a limit."""
        if not items:
            return
        settings = self._settings
        by_queue: dict[tuple[str, Priority], int] = {}
        for item in items:
            queue = (item.model, item.body.priority)
            by_queue[queue] = by_queue.get(queue, 0) + 1
        depths = self._queue_depths()
        for (model, priority), count in by_queue.items():
            waiting = _waiting(depths, model, priority)
            if waiting + count > settings.max_queued_per_model:
                whose = "interactive requests" if priority is Priority.INTERACTIVE else "requests"
                raise TooBusy(
                    f"model {model!r} has {waiting} {whose} waiting; the limit "
                    f"is {settings.max_queued_per_model}",
                    retry_after=5,
                )
        tenant = items[0].tenant_id
        inflight = self._tenant_inflight(tenant)
        if inflight + len(items) > settings.max_inflight_per_tenant:
            raise TooBusy(
                f"{inflight} requests of yours are in flight; the limit is "
                f"{settings.max_inflight_per_tenant}",
                retry_after=2,
            )
        budgeted = [item.reserved_cost for item in items if item.reserved_cost is not None]
        money = sum(budgeted)
        if budgeted and (refused := self.spend.refusal(tenant, money)) is not None:
            message, retry_after = refused
            raise TooBusy(message, retry_after=retry_after)
        self._spend_tokens(tenant, sum(cost(item) for item in items))
        self._count_in(tenant, len(items), by_queue)
        if money:
            self.spend.count_in(tenant, money)

    def _count_in(
        self, tenant: uuid.UUID, count: int, by_queue: dict[tuple[str, Priority], int]
    ) -> None:
        """Until the next look at the database, count what this process let in."""
        with self._lock:
            at, inflight = self._inflight[tenant]
            self._inflight[tenant] = (at, inflight + count)
            at, depths = self._depths
            self._depths = (
                at,
                {**depths, **{q: depths.get(q, 0) + n for q, n in by_queue.items()}},
            )

    def _spend_tokens(self, tenant: uuid.UUID, tokens: int) -> None:
        limit = self._settings.tenant_tokens_per_minute
        if not limit or not tokens:
            return
        try:
            used = self._budget.reserve(tenant, tokens)
        except redis.RedisError:
            log.warning("token budget unavailable; not enforced", exc_info=True)
            return
        if used is not None:
            retry_after = WINDOW_S - int(time.time()) % WINDOW_S
            raise TooBusy(
                f"{used} tokens used this minute (prompts, and max_tokens x n reserved for "
                f"output); this needs {tokens} more and the limit is {limit} a minute",
                retry_after=max(retry_after, 1),
            )

    def _queue_depths(self) -> Depths:
        with self._lock:
            at, depths = self._depths
            if time.monotonic() - at < _CACHE_S:
                return depths
        with self._sessions() as session:
            rows = session.execute(
                select(Request.model, Request.priority, func.count())
                .where(Request.status == RequestStatus.QUEUED)
                .group_by(Request.model, Request.priority)
            )
            depths = {(model, priority): int(count) for model, priority, count in rows}
        with self._lock:
            self._depths = (time.monotonic(), depths)
        return depths

    def _tenant_inflight(self, tenant: uuid.UUID) -> int:
        with self._lock:
            at, count = self._inflight.get(tenant, (0.0, 0))
            if time.monotonic() - at < _CACHE_S:
                return count
        with self._sessions() as session:
            count = int(
                session.scalar(
                    select(func.count())
                    .select_from(Request)
                    .where(Request.tenant_id == tenant, Request.status.in_(OPEN_STATUSES))
                )
                or 0
            )
        with self._lock:
            self._inflight[tenant] = (time.monotonic(), count)
        return count


def _waiting(depths: Depths, model: str, priority: Priority) -> int:
    """What a new request waits behind: interactive work runs first, so an interactive
    request waits only behind interactive ones; bulk work waits behind everything."""
    if priority is Priority.INTERACTIVE:
        return depths.get((model, Priority.INTERACTIVE), 0)
    return sum(n for (m, _), n in depths.items() if m == model)
