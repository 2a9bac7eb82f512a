"""API keys: ``Authorization: Bearer KEY``, as the OpenAI client sends it.

Resolved keys are cached for a short while per process, so a busy client costs no database
round trip per call; a revoked key stops working within ``CACHE_TTL_S``. Both the cache and
the database are keyed by the key's SHA-256 digest, never the key: see
:func:`storage.tenants.tenant_for_key` for why lookup by digest leaks nothing through timing.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session, sessionmaker

from storage.models import Tenant
from storage.tenants import hash_key, tenant_for_key

if TYPE_CHECKING:
    from api.service import Services

CACHE_TTL_S = 30.0


class KeyCache:
    """Key hash → tenant, for at most ``ttl_s`` seconds; misses go to the database."""

    def __init__(self, sessions: sessionmaker[Session], ttl_s: float = CACHE_TTL_S) -> None:
        self._sessions = sessions
        self._ttl_s = ttl_s
        self._entries: dict[str, tuple[float, Tenant]] = {}
        self._lock = threading.Lock()

    def tenant(self, key: str) -> Tenant | None:
        digest = hash_key(key)
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(digest)
        if entry is not None and entry[0] > now:
            return entry[1]
        with self._sessions() as session:
            tenant = tenant_for_key(session, key)
        if tenant is not None:
            with self._lock:
                self._entries[digest] = (now + self._ttl_s, tenant)
        return tenant


async def current_tenant(request: Request) -> Tenant:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    keys: KeyCache = request.app.state.keys
    tenant = await run_in_threadpool(keys.tenant, key.strip())
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
