"""The FastAPI app factory: services are built in the lifespan hook, handlers live in routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from api.admission import Admitter
from api.auth import KeyCache
from api.committer import GroupCommitter
from api.job_routes import router as job_router
from api.openai_routes import router as openai_router
from api.routes import router
from api.service import BadRequest, Services
from api.webhooks import router as webhooks_router
from inferq.models import PromptMeter, resolve_model_path
from inferq.settings import Settings
from router import load_config
from storage.db import make_engine, make_sessionmaker
from tasks.app import create_celery


def build_services(settings: Settings) -> Services:
    """Everything the handlers need: config, database, broker producer, token meters."""
    config = load_config(settings.config)
    meters = {
        name: PromptMeter(resolve_model_path(spec.path, settings))
        for name, spec in config.models.items()
    }
    return Services(
        settings=settings,
        config=config,
        sessions=make_sessionmaker(make_engine(settings.database_url)),
        celery=create_celery(settings, config),
        meters=meters,
    )


def create_app(settings: Settings, services: Services | None = None) -> FastAPI:
    """Build the API. ``services`` may be passed in to share them (the embedded mode does)."""
    load_config(settings.config)  # config errors surface at start, naming file and key

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = services is None
        app.state.services = services or await run_in_threadpool(build_services, settings)
        app.state.keys = KeyCache(app.state.services.sessions)
        app.state.committer = GroupCommitter(app.state.services)
        app.state.committer.start()
        app.state.admitter = Admitter(app.state.services)
        app.state.admitter.start()
        yield
        app.state.admitter.stop()
        app.state.committer.stop()
        if owned:
            app.state.services.dispose()

    app = FastAPI(title="inferq", version="0.1.0", lifespan=lifespan)
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.max_body_bytes,
        max_upload_bytes=settings.max_upload_bytes,
    )
    app.exception_handler(BadRequest)(_bad_request)
    app.include_router(router)
    app.include_router(job_router)
    app.include_router(webhooks_router)
    app.include_router(openai_router)
    return app


async def _bad_request(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


UPLOAD_PATHS = ("/v1/jobs", "/v1/files")


class BodyLimit:
    """Refuse a body over the limit by its Content-Length, before reading it (pure ASGI)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            upload = scope["path"].startswith(UPLOAD_PATHS)
            limit = self.max_upload_bytes if upload else self.max_bytes
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > limit:
                detail = f"request body is {int(length)} bytes; the limit is {limit}"
                response = JSONResponse(
                    {"detail": detail},
                    status_code=status.HTTP_413_CONTENT_TOO_LARGE,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
