"""The FastAPI app factory: services are built in the lifespan hook, handlers live in routes."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.admission import Admitter
from api.auth import KeyCache
from api.committer import GroupCommitter
from api.job_routes import router as job_router
from api.metrics import install_metrics
from api.openai_errors import error_response
from api.openai_routes import router as openai_router
from api.routes import router
from api.schemas import ERRORS
from api.waits import WaitSlots
from api.webhooks import router as webhooks_router
from core.settings import Settings
from maintenance.reconciler import Reconciler
from router import load_config
from submission.limits import TooBusy
from submission.live_config import LiveConfig
from submission.prepare import BadRequest
from submission.services import Services, build_services
from tasks.streams import create_reader

log = logging.getLogger(__name__)
RETRY_AFTER_S = 5


def create_app(settings: Settings, services: Services | None = None) -> FastAPI:
    """Build the API. ``services`` may be passed in to share them (the embedded mode does)."""
    load_config(settings.config)  # config errors surface at start, naming file and key

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = services is None
        app.state.services = services or await run_in_threadpool(build_services, settings)
        app.state.keys = KeyCache.create(settings, app.state.services.sessions)
        app.state.committer = GroupCommitter(app.state.services)
        app.state.committer.start()
        app.state.waits = WaitSlots(settings.max_waits_per_tenant)
        app.state.admitter = Admitter(app.state.services)
        app.state.admitter.start()
        app.state.streams = create_reader(settings)
        reconciler = _reconciler(app.state.services)
        live = await run_in_threadpool(_live_config, app.state.services)
        live.install_sighup()  # on the main thread, where uvicorn runs the lifespan
        yield
        live.stop()
        if reconciler is not None:
            reconciler.stop()
        app.state.admitter.stop()
        app.state.committer.stop()
        await app.state.streams.aclose()
        if owned:
            app.state.services.dispose()

    app = FastAPI(title="inferq", version="0.1.0", lifespan=lifespan)
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.max_body_bytes,
        max_upload_bytes=settings.max_upload_bytes,
    )
    app.exception_handler(RequestValidationError)(_invalid)
    app.exception_handler(BadRequest)(_bad_request)
    app.exception_handler(TooBusy)(_too_busy)
    app.exception_handler(OperationalError)(_database_down)
    app.exception_handler(InterfaceError)(_database_down)
    app.include_router(router, responses=ERRORS)
    app.include_router(job_router, responses=ERRORS)
    app.include_router(webhooks_router, responses=ERRORS)
    app.include_router(openai_router)
    install_metrics(app, token=settings.metrics_token)
    return app


def _live_config(services: Services) -> LiveConfig:
    """Route by the file and the canary decisions, reloaded on change and on SIGHUP."""
    settings = services.settings
    live = LiveConfig(
        settings.config,
        services.sessions,
        poll_s=settings.config_poll_s,
        on_change=services.use_config,
    )
    services.use_config(live.current())
    live.start()
    return live


def _reconciler(services: Services) -> Reconciler | None:
    if not services.settings.reconciler:
        return None
    reconciler = Reconciler(services.settings, services.config, services.sessions, services.celery)
    reconciler.start()
    return reconciler


async def _too_busy(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TooBusy)
    return JSONResponse(
        {"detail": str(exc)},
        status_code=status.HTTP_429_TOO_MANY_REQUESTS,
        headers={"Retry-After": str(exc.retry_after)},
    )


async def _database_down(_: Request, exc: Exception) -> JSONResponse:
    """Postgres is unreachable: nothing was accepted; the client should retry shortly."""
    log.warning("database unavailable: %s", exc)
    return JSONResponse(
        {"detail": "the database is unavailable; nothing was accepted, retry shortly"},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


async def _invalid(_: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, except that an input JSON cannot carry (Python's json reads ``NaN`` and
    ``Infinity``; a JSON answer cannot hold them) is echoed as text instead of failing with 500."""
    assert isinstance(exc, RequestValidationError)
    detail = _json_safe(jsonable_encoder(exc.errors()))
    return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


async def _bad_request(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


UPLOAD_PATHS = ("/v1/jobs", "/v1/files")
OPENAI_PATHS = ("/v1/files", "/v1/batches", "/v1/chat/")


class BodyLimit:
    """Refuse a body over the limit (pure ASGI): by its Content-Length before reading it, and
    by counting what arrives, so a body without one (chunked) is not read past the limit."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope["path"].startswith(UPLOAD_PATHS)
        limit = self.max_upload_bytes if upload else self.max_bytes
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            detail = f"request body is {int(length)} bytes; the limit is {limit}"
            await _too_large(scope, detail)(scope, receive, send)
            return
        await _CountedBody(self.app, limit)(scope, receive, send)


class _CountedBody:
    """One request whose body is counted as it arrives. Past the limit the client is answered
    413, the app reads a disconnect, and whatever the app answers after that is dropped."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit
        self.received, self.refused, self.started = 0, False, False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counting_receive() -> Message:
            if self.refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                self.received += len(message.get("body", b""))
                if self.received > self.limit:
                    self.refused = True
                    if not self.started:
                        detail = f"request body is over the limit of {self.limit} bytes"
                        await _too_large(scope, detail)(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not self.refused:
                self.started = True
                await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not self.refused:  # the app failed on the disconnect it was handed
                raise


def _too_large(scope: Scope, detail: str) -> JSONResponse:
    if scope["path"].startswith(OPENAI_PATHS):
        return error_response(413, detail, code="request_too_large")
    return JSONResponse({"detail": detail}, status_code=status.HTTP_413_CONTENT_TOO_LARGE)
