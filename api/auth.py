"""API keys: ``Authorization: Bearer KEY``, as the OpenAI client sends it.

Resolved keys are cached for ``auth_cache_ttl_s`` per process, so a busy client costs no
database round trip per call; a revoked key stops working within that time. Unknown keys are
cached too, and a key that is not even shaped like one is refused without a lookup. What
remains (new well-formed keys) is throttled per client address, so a flood of made-up bearer
tokens costs the database a few lookups, not one each: past the burst the answer is 429 with
``Retry-After``, while keys already cached keep working. Cache and database are keyed by the
key's SHA-256 digest, never the key: see :func:`storage.tenants.tenant_for_key` for why
lookup by digest leaks nothing through timing.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from typing import Annotated, TypeVar

from fastapi import Depends, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from storage.tables import Tenant
from storage.tenants import hash_key, tenant_for_key, well_formed
from submission.services import Services

V = TypeVar("V")
MAX_ENTRIES = 100_000  # per cache: bounds the memory a flood of distinct tokens can take


class TooManyMisses(Exception):
    """This client presented too many unknown keys lately; try again after ``retry_after_s``."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__("too many invalid API keys")
        self.retry_after_s = retry_after_s


class MissThrottle:
    """A token bucket per client: database lookups of keys not in the cache."""

    def __init__(self, *, burst: int, per_s: float) -> None:
        self._burst = float(burst)
        self._per_s = per_s
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str, now: float) -> None:
        tokens, then = self._buckets.pop(client, (self._burst, now))
        tokens = min(self._burst, tokens + (now - then) * self._per_s)
        if tokens < 1:
            self._buckets[client] = (tokens, now)
            raise TooManyMisses((1 - tokens) / self._per_s)
        self._buckets[client] = (tokens - 1, now)
        _bound(self._buckets)

    def give_back(self, client: str) -> None:
        """A lookup that found a key was no miss: its token returns."""
        if client in self._buckets:
            tokens, then = self._buckets[client]
            self._buckets[client] = (min(self._burst, tokens + 1), then)


class KeyCache:
    """Key digest → tenant (or no tenant) for ``ttl_s`` seconds; misses go to the database."""

    def __init__(
        self, sessions: sessionmaker[Session], *, ttl_s: float, miss_burst: int, miss_per_s: float
    ) -> None:
        self._sessions = sessions
        self._ttl_s = ttl_s
        self._found: OrderedDict[str, tuple[float, Tenant]] = OrderedDict()
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._throttle = MissThrottle(burst=miss_burst, per_s=miss_per_s)
        self._lock = threading.Lock()

    @classmethod
    def create(cls, settings: Settings, sessions: sessionmaker[Session]) -> KeyCache:
        return cls(
            sessions,
            ttl_s=settings.auth_cache_ttl_s,
            miss_burst=settings.auth_miss_burst,
            miss_per_s=settings.auth_miss_per_s,
        )

    def tenant(self, key: str, *, client: str) -> Tenant | None:
        """The key's tenant, or None; raises TooManyMisses instead of a throttled lookup."""
        if not well_formed(key):
            return None
        digest = hash_key(key)
        now = time.monotonic()
        with self._lock:
            found = self._found.get(digest)
            if found is not None and found[0] > now:
                return found[1]
            if self._unknown.get(digest, 0.0) > now:
                return None
            # A key resolved before is looked up again once its entry expires (it may have
            # been revoked) without a throttle token: only keys that once worked get this, so
            # a flood of made-up keys cannot, and a known client is not refused mid-flood.
            throttled = found is None
            if throttled:
                self._throttle.take(client, now)
        with self._sessions() as session:
            tenant = tenant_for_key(session, key)
        with self._lock:
            if tenant is None:
                self._found.pop(digest, None)
                self._unknown[digest] = now + self._ttl_s
                _bound(self._unknown)
            else:
                if throttled:
                    self._throttle.give_back(client)
                self._found[digest] = (now + self._ttl_s, tenant)
                _bound(self._found)
        return tenant


def _bound(entries: OrderedDict[str, V]) -> None:
    while len(entries) > MAX_ENTRIES:
        entries.popitem(last=False)


async def current_tenant(request: Request) -> Tenant:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    keys: KeyCache = request.app.state.keys
    client = request.client.host if request.client else ""
    try:
        tenant = await run_in_threadpool(keys.tenant, key.strip(), client=client)
    except TooManyMisses as exc:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            "too many invalid API keys from this address; try again later",
            headers={"Retry-After": str(math.ceil(exc.retry_after_s))},
        ) from exc
    if tenant is None:
        raise _unauthorized("invalid API key")
    return tenant


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"}
    )


Caller = Annotated[Tenant, Depends(current_tenant)]


def services_of(request: Request) -> Services:
    """The process's services, built once in the app's lifespan."""
    services: Services = request.app.state.services
    return services
