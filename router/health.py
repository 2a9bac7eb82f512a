"""What routing learns from Redis: which models are cooling down, how deep their queues are.

The circuit breaker's state is shared by every process: workers count a model's failed
attempts (a batch with any success resets the count), and once ``breaker.failures`` fail in
a row the model is cooled down for ``breaker.cooldown_s``; the API then sends its work down
the route's chain. Keys carry the broker's key prefix, like the queues, so deployments (or
test sessions) sharing one Redis stay apart. Embedded mode has no Redis: each part keeps
its state in a dict (the API does not see the in-process workers' count) and queues report
no depth there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

import redis

from inferq.settings import Settings
from router.config import BreakerSpec
from router.route import Route
from tasks.queues import model_queues

log = logging.getLogger(__name__)

# kombu's Redis transport keeps a priority queue as one list per priority step.
_PRIORITY_STEPS = (0, 3, 6, 9)
_PRIORITY_SEP = "\x06\x16"


class _Store(Protocol):
    def incrby(self, name: str, amount: int) -> int: ...
    def delete(self, *names: str) -> int: ...
    def set(self, name: str, value: str, *, px: int) -> object: ...
    def exists(self, *names: str) -> int: ...


class ModelHealth:
    """The breaker and queue depths of every model, as the API and the workers share them."""

    def __init__(self, store: _Store, *, prefix: str, breaker: BreakerSpec) -> None:
        self._store = store
        self._prefix = prefix
        self._breaker = breaker

    @classmethod
    def create(cls, settings: Settings, breaker: BreakerSpec) -> ModelHealth:
        """On the broker's Redis in service mode; in this process when embedded."""
        store: _Store
        if settings.broker_url.startswith(("redis://", "rediss://")):
            store = redis.Redis.from_url(settings.broker_url)
        else:
            store = _MemoryStore()
        return cls(store, prefix=settings.broker_key_prefix, breaker=breaker)

    def cooled(self, model: str) -> bool:
        """Whether ``model`` is cooling down after failing too often."""
        return bool(self._store.exists(self._key(model, "open")))

    def queue_depth(self, model: str) -> int:
        """Messages (bundles of requests) waiting on the model's queues, all priorities."""
        if not isinstance(self._store, redis.Redis):
            return 0
        with self._store.pipeline(transaction=False) as pipe:
            for queue in model_queues(model):
                queue = self._prefix + queue
                for step in _PRIORITY_STEPS:
                    pipe.llen(f"{queue}{_PRIORITY_SEP}{step}" if step else queue)
            return sum(int(n) for n in pipe.execute())

    def checker(self) -> Callable[[Route], str | None]:
        """Why a route's model should not take a request now, or None.

        Answers are kept for the checker's life, so a bulk job of many lines costs one look
        per model; make one per submission.
        """
        answers: dict[tuple[str, int | None], str | None] = {}

        def why_not(chosen: Route) -> str | None:
            key = (chosen.model, chosen.max_queue_depth)
            if key not in answers:
                try:
                    answers[key] = self._why_not(chosen.model, chosen.max_queue_depth)
                except redis.RedisError:  # no signal: route as configured, the commit decides
                    log.warning("no health for %s from Redis", chosen.model, exc_info=True)
                    answers[key] = None
            return answers[key]

        return why_not

    def _why_not(self, model: str, max_queue_depth: int | None) -> str | None:
        if self.cooled(model):
            return "cooling down after repeated failures"
        if max_queue_depth is not None:
            depth = self.queue_depth(model)
            if depth > max_queue_depth:
                return f"queue depth {depth} over the route's {max_queue_depth}"
        return None

    def record(self, model: str, *, succeeded: int, failed: int) -> bool:
        """Count one batch's attempts; return True when this batch cooled the model down."""
        failures = self._key(model, "failures")
        if succeeded or not failed:
            self._store.delete(failures)
            return False
        if self._store.incrby(failures, failed) < self._breaker.failures:
            return False
        cooldown_ms = max(int(self._breaker.cooldown_s * 1000), 1)
        self._store.set(self._key(model, "open"), "1", px=cooldown_ms)
        self._store.delete(failures)
        return True

    def reset(self, model: str) -> None:
        """Close the breaker now (an operator, or a test, knows the model is back)."""
        self._store.delete(self._key(model, "open"), self._key(model, "failures"))

    def close(self) -> None:
        if isinstance(self._store, redis.Redis):
            self._store.close()

    def _key(self, model: str, what: str) -> str:
        return f"{self._prefix}inferq.breaker.{model}.{what}"


class _MemoryStore:
    """The four Redis commands the breaker uses, for a single embedded process."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def incrby(self, name: str, amount: int) -> int:
        with self._lock:
            value = self._live(name) + amount
            self._values[name] = (value, float("inf"))
            return value

    def delete(self, *names: str) -> int:
        with self._lock:
            return sum(self._values.pop(name, None) is not None for name in names)

    def set(self, name: str, value: str, *, px: int) -> object:
        with self._lock:
            self._values[name] = (int(value), time.monotonic() + px / 1000)
        return True

    def exists(self, *names: str) -> int:
        with self._lock:
            return sum(name in self._values and self._live(name) > 0 for name in names)

    def _live(self, name: str) -> int:
        value, expires = self._values.get(name, (0, float("inf")))
        return value if time.monotonic() < expires else 0
