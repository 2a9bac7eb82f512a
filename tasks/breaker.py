"""The circuit breaker: which models are cooling down after failing too often.

Its state is shared by every process on the broker's Redis: workers count a model's failed
attempts (a batch with any success resets the count), and once ``breaker.failures`` fail in
a row the model is cooled down for ``breaker.cooldown_s``; submitting then sends its work down
the route's chain. Keys carry the broker's key prefix, like the queues, so deployments (or
test sessions) sharing one Redis stay apart. Embedded mode has no Redis: each part keeps
its state in a dict (the API does not see the in-process workers' count).
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

import redis

from core.settings import Settings
from router.config import BreakerSpec
from tasks.broker_redis import redis_client, uses_redis


class _Store(Protocol):
    def incrby(self, name: str, amount: int) -> int: ...
    def delete(self, *names: str) -> int: ...
    def set(self, name: str, value: str, *, px: int) -> object: ...
    def exists(self, *names: str) -> int: ...


class Breaker:
    """Every model's breaker, as the API and the workers share it."""

    def __init__(self, store: _Store, *, prefix: str, spec: BreakerSpec) -> None:
        self._store = store
        self._prefix = prefix
        self._spec = spec

    @classmethod
    def create(cls, settings: Settings, spec: BreakerSpec) -> Breaker:
        """On the broker's Redis in service mode; in this process when embedded."""
        store: _Store
        if uses_redis(settings):
            store = redis_client(settings)
        else:
            store = _MemoryStore()
        return cls(store, prefix=settings.broker_key_prefix, spec=spec)

    def cooled(self, model: str) -> bool:
        """Whether ``model`` is cooling down after failing too often."""
        return bool(self._store.exists(self._key(model, "open")))

    def record(self, model: str, *, succeeded: int, failed: int) -> bool:
        """Count one batch's attempts; return True when this batch cooled the model down."""
        failures = self._key(model, "failures")
        if succeeded or not failed:
            self._store.delete(failures)
            return False
        if self._store.incrby(failures, failed) < self._spec.failures:
            return False
        cooldown_ms = max(int(self._spec.cooldown_s * 1000), 1)
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
