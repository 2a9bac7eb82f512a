"""Backpressure: refuse work with 429 and ``Retry-After`` before anything is written.

Three limits, each cheap to check per request:

* a model's queue: at most ``max_queued_per_model`` requests waiting (counted in Postgres, one
  grouped query a second), so a model that cannot keep up pushes back instead of growing
  latency without bound;
* a tenant's requests in flight (queued or running): at most ``max_inflight_per_tenant``;
* a tenant's prompt tokens per minute: at most ``tenant_tokens_per_minute`` (0: no limit), in a
  fixed one-minute window on the broker's Redis, shared by every API process. If Redis is
  unreachable this limit is not enforced (the API keeps accepting; see DESIGN.md).

Large bulk jobs are not counted here: they are admitted gradually (``api.admission``).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Protocol

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from inferq.enums import OPEN_STATUSES, RequestStatus
from inferq.settings import Settings
from storage.models import Request

log = logging.getLogger(__name__)

_CACHE_S = 1.0
_WINDOW_S = 60


class TooBusy(Exception):
    """A limit is reached; the message names it, ``retry_after`` says when to try again."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Sized(Protocol):
    tenant_id: uuid.UUID
    model: str
    prompt_tokens: int


class _Counter(Protocol):
    def add(self, key: str, amount: int, *, ttl_s: int) -> int: ...


class Limits:
    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], counter: _Counter
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._counter = counter
        self._lock = threading.Lock()
        self._depths: tuple[float, dict[str, int]] = (0.0, {})
        self._inflight: dict[uuid.UUID, tuple[float, int]] = {}

    @classmethod
    def create(cls, settings: Settings, sessions: sessionmaker[Session]) -> Limits:
        counter: _Counter
        if settings.broker_url.startswith(("redis://", "rediss://")):
            counter = RedisCounter(redis.Redis.from_url(settings.broker_url))
        else:
            counter = MemoryCounter()
        return cls(settings, sessions, counter)

    def admit(self, items: Sequence[_Sized]) -> None:
        """Raise :class:`TooBusy` if taking ``items`` now would break a limit."""
        if not items:
            return
        settings = self._settings
        by_model: dict[str, int] = {}
        for item in items:
            by_model[item.model] = by_model.get(item.model, 0) + 1
        depths = self._queue_depths()
        for model, count in by_model.items():
            if depths.get(model, 0) + count > settings.max_queued_per_model:
                raise TooBusy(
                    f"model {model!r} has {depths.get(model, 0)} requests waiting; the limit "
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
        self._spend_tokens(tenant, sum(item.prompt_tokens for item in items))
        self._count_in(tenant, len(items), by_model)

    def _count_in(self, tenant: uuid.UUID, count: int, by_model: dict[str, int]) -> None:
        """Until the next look at the database, count what this process let in."""
        with self._lock:
            at, inflight = self._inflight[tenant]
            self._inflight[tenant] = (at, inflight + count)
            at, depths = self._depths
            self._depths = (
                at,
                {**depths, **{m: depths.get(m, 0) + n for m, n in by_model.items()}},
            )

    def _spend_tokens(self, tenant: uuid.UUID, tokens: int) -> None:
        limit = self._settings.tenant_tokens_per_minute
        if not limit or not tokens:
            return
        window = int(time.time()) // _WINDOW_S
        key = f"{self._settings.broker_key_prefix}inferq.tpm.{tenant}.{window}"
        try:
            used = self._counter.add(key, tokens, ttl_s=2 * _WINDOW_S)
        except redis.RedisError:
            log.warning("token budget unavailable; not enforced", exc_info=True)
            return
        if used > limit:
            self._counter.add(key, -tokens, ttl_s=2 * _WINDOW_S)  # refused work costs nothing
            retry_after = _WINDOW_S - int(time.time()) % _WINDOW_S
            raise TooBusy(
                f"{used - tokens} prompt tokens used this minute; the limit is {limit} a minute",
                retry_after=max(retry_after, 1),
            )

    def _queue_depths(self) -> dict[str, int]:
        with self._lock:
            at, depths = self._depths
            if time.monotonic() - at < _CACHE_S:
                return depths
        with self._sessions() as session:
            rows = session.execute(
                select(Request.model, func.count())
                .where(Request.status == RequestStatus.QUEUED)
                .group_by(Request.model)
            )
            depths = {model: int(count) for model, count in rows}
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


class RedisCounter:
    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def add(self, key: str, amount: int, *, ttl_s: int) -> int:
        with self._client.pipeline(transaction=False) as pipe:
            pipe.incrby(key, amount)
            pipe.expire(key, ttl_s)
            used, _ = pipe.execute()
        return int(used)


class MemoryCounter:
    """The embedded mode's single process: the same window in a dict."""

    def __init__(self) -> None:
        self._values: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, key: str, amount: int, *, ttl_s: int) -> int:
        del ttl_s  # one key a minute; the few old ones are harmless in a short-lived demo
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount
            return self._values[key]
