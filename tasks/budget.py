"""A tenant's tokens per minute: reserved when work is admitted, settled when it finishes.

A fixed one-minute window on the broker's Redis, shared by every API process and worker (a
dict in the embedded mode's single process). Admitting a request reserves its prompt tokens
plus the most it may generate, ``max_tokens`` x ``n``; when it finishes, its worker gives back
what it did not generate, to the window it was reserved in while that window is current (a
later window was never charged for it) and holds a reservation (with the limit off, nothing
was reserved and nothing is given back).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Protocol

import redis

from core.enums import Outcome
from core.settings import Settings
from storage.ledger import Attempt
from tasks.broker_redis import redis_client, uses_redis
from tasks.contract import EngineRequest

log = logging.getLogger(__name__)

WINDOW_S = 60
_SETTLED = (Outcome.SUCCEEDED, Outcome.FAILED)  # attempts that ended their request


class Counter(Protocol):
    def add(self, key: str, amount: int, *, ttl_s: int) -> int: ...

    def add_existing(self, key: str, amount: int) -> None:
        """Add to ``key`` only if it exists: a window nobody reserved in stays unset."""


def reserved_output(request: EngineRequest) -> int:
    """The most a request may generate: what admission reserves beside its prompt."""
    return request.max_tokens * request.n


class TokenBudget:
    def __init__(self, settings: Settings, counter: Counter) -> None:
        self.limit = settings.tenant_tokens_per_minute
        self._prefix = settings.broker_key_prefix
        self._counter = counter

    @classmethod
    def create(cls, settings: Settings) -> TokenBudget:
        counter: Counter
        if uses_redis(settings):
            counter = RedisCounter(redis_client(settings))
        else:
            counter = MemoryCounter()
        return cls(settings, counter)

    def reserve(self, tenant: uuid.UUID, tokens: int) -> int | None:
        """Reserve ``tokens`` in this minute's window; None if they fit, else what the window
        held before (nothing is kept then: refused work costs nothing).

        Raises:
            redis.RedisError: the budget cannot be read.
        """
        key = self._key(tenant, _window(time.time()))
        used = self._counter.add(key, tokens, ttl_s=2 * WINDOW_S)
        if used <= self.limit:
            return None
        self._counter.add(key, -tokens, ttl_s=2 * WINDOW_S)
        return used - tokens

    def settle(self, attempts: Sequence[Attempt], outcomes: Sequence[Outcome]) -> None:
        """A writer's commit hook: give back the output tokens that finished requests
        reserved and did not generate."""
        now = _window(time.time())
        unused: dict[uuid.UUID, int] = {}
        for attempt, outcome in zip(attempts, outcomes, strict=True):
            if outcome not in _SETTLED or attempt.falls_back or attempt.reserved_at is None:
                continue
            if _window(attempt.reserved_at) != now:
                continue
            spare = max(attempt.reserved_tokens - attempt.completion_tokens, 0)
            unused[attempt.tenant_id] = unused.get(attempt.tenant_id, 0) + spare
        for tenant, tokens in unused.items():
            if tokens:
                try:
                    self._counter.add_existing(self._key(tenant, now), -tokens)
                except redis.RedisError:  # the window ends within a minute anyway
                    log.warning("settling %d tokens of %s failed", tokens, tenant, exc_info=True)

    def _key(self, tenant: uuid.UUID, window: int) -> str:
        return f"{self._prefix}inferq.tpm.{tenant}.{window}"


def _window(at: float) -> int:
    return int(at) // WINDOW_S


class RedisCounter:
    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def add(self, key: str, amount: int, *, ttl_s: int) -> int:
        with self._client.pipeline(transaction=False) as pipe:
            pipe.incrby(key, amount)
            pipe.expire(key, ttl_s)
            used, _ = pipe.execute()
        return int(used)

    def add_existing(self, key: str, amount: int) -> None:
        self._client.eval(_ADD_EXISTING, 1, key, amount)


_ADD_EXISTING = """
if redis.call('exists', KEYS[1]) == 1 then return redis.call('incrby', KEYS[1], ARGV[1]) end
return nil
"""


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

    def add_existing(self, key: str, amount: int) -> None:
        with self._lock:
            if key in self._values:
                self._values[key] += amount
