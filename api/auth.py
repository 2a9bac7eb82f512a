"""API keys: ``Authorization: Bearer KEY``, as the OpenAI client sends it."""

from __future__ import annotations

from fastapi import HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool

from storage.models import Tenant
from storage.tenants import tenant_for_key


async def current_tenant(request: Request) -> Tenant:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    sessions = request.app.state.services.sessions

    def lookup() -> Tenant | None:
        with sessions() as session:
            return tenant_for_key(session, key.strip())

    tenant = await run_in_threadpool(lookup)
    if tenant is None:
        raise _unauthorized("invalid API key")
    return tenant


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"}
    )
