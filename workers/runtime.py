"""One worker process's runtime: its engine, batcher and writer, created once at start."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from datetime import UTC, datetime
from functools import partial

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from inferq.enums import Outcome
from inferq.models import resolve_model_path
from inferq.settings import Settings
from router.config import RouterConfig
from storage.ledger import claim
from tasks.contract import RunMessage
from tasks.webhooks import publish_deliveries
from workers.batcher import MicroBatcher
from workers.engines import Engine, create_engine
from workers.executor import BatchExecutor
from workers.writer import BatchWriter


def _claim(
    sessions: sessionmaker[Session], request_ids: list[uuid.UUID], at: float
) -> set[uuid.UUID]:
    with sessions.begin() as session:
        return claim(session, request_ids, datetime.fromtimestamp(at, UTC))


class WorkerRuntime:
    """Owns the engine for one model; Celery's task threads hand it requests."""

    def __init__(
        self,
        engine: Engine,
        *,
        model: str,
        config: RouterConfig,
        sessions: sessionmaker[Session],
        worker_name: str,
        publish_deliveries: Callable[[list[uuid.UUID]], None],
    ) -> None:
        spec = config.models[model]
        self.model = model
        self.spec = spec
        self.engine = engine
        self.writer = BatchWriter(sessions, publish_deliveries)
        executor = BatchExecutor(
            engine,
            model=model,
            spec=spec,
            worker=worker_name,
            writer=self.writer,
            claim=partial(_claim, sessions),
        )
        self.batcher = MicroBatcher(
            executor,
            max_batch_size=spec.max_batch_size,
            window_s=spec.batch_window_ms / 1000,
            name=f"inferq-executor-{model}",
        )

    @classmethod
    def create(
        cls,
        settings: Settings,
        config: RouterConfig,
        model: str,
        sessions: sessionmaker[Session],
        celery: Celery,
    ) -> WorkerRuntime:
        """Load the model's engine (once per process) and wire the runtime around it."""
        if model not in config.models:
            known = ", ".join(sorted(config.models))
            raise ValueError(f"unknown model {model!r}; configured: {known}")
        spec = config.models[model]
        engine = create_engine(spec, model_path=resolve_model_path(spec.path, settings))
        name = settings.worker_name or f"{model}@{socket.gethostname()}:{os.getpid()}"
        return cls(
            engine,
            model=model,
            config=config,
            sessions=sessions,
            worker_name=name,
            publish_deliveries=partial(publish_deliveries, celery),
        )

    @property
    def buffer_size(self) -> int:
        """Messages held at once: one batch running, one filling, so the engine never waits."""
        return 2 * self.spec.max_batch_size

    def start(self) -> None:
        self.writer.start()
        self.batcher.start()

    def submit(self, message: RunMessage) -> Future[Outcome]:
        return self.batcher.submit(message)

    def stop(self) -> None:
        self.batcher.stop()
        self.writer.stop()
        self.engine.close()
