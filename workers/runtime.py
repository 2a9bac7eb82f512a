"""One worker process's runtime: its engine, batcher and writer, created once at start."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from inferq.enums import Outcome
from inferq.models import resolve_model_path
from inferq.quality.pool import PoolSampler
from inferq.settings import Settings
from router.config import RouterConfig
from router.health import ModelHealth
from storage.ledger import Attempt
from tasks.app import publish_by_model
from tasks.contract import RunMessage
from tasks.webhooks import publish_deliveries
from workers.batcher import MicroBatcher
from workers.engines import Engine, create_engine
from workers.executor import BatchExecutor
from workers.fallbacks import BreakerHook
from workers.leases import Leases
from workers.writer import BatchWriter


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
        publish_runs: Callable[[list[RunMessage]], None] | None = None,
        leases: Leases | None = None,
    ) -> None:
        spec = config.models[model]
        self.leases = leases or Leases(sessions)
        self.model = model
        self.spec = spec
        self.engine = engine
        self.writer = BatchWriter(sessions, publish_deliveries, publish_runs=publish_runs)
        executor = BatchExecutor(
            engine,
            model=model,
            spec=spec,
            worker=worker_name,
            writer=self.writer,
            claim=self.leases.claim,
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
        runtime = cls(
            engine,
            model=model,
            config=config,
            sessions=sessions,
            worker_name=name,
            publish_deliveries=partial(publish_deliveries, celery),
            publish_runs=partial(publish_by_model, celery, config),
            leases=Leases.from_settings(settings, sessions, worker=name),
        )
        health = ModelHealth.create(settings, config.breaker)
        runtime.writer.add_commit_hook(BreakerHook(health, model))
        pool = PoolSampler.from_settings(settings)
        if pool is not None:
            runtime.writer.add_transaction_hook(partial(_sample_succeeded, pool))
        return runtime

    @property
    def buffer_size(self) -> int:
        """Messages held at once: one batch running, one filling, so the engine never waits."""
        return 2 * self.spec.max_batch_size

    def start(self) -> None:
        self.leases.start()
        self.writer.start()
        self.batcher.start()

    def submit(self, message: RunMessage) -> Future[Outcome]:
        future = self.batcher.submit(message)
        request_id = uuid.UUID(message.request_id)
        future.add_done_callback(lambda _: self.leases.release(request_id))
        return future

    def stop(self) -> None:
        self.batcher.stop()
        self.writer.stop()
        self.leases.stop()
        self.engine.close()


def _sample_succeeded(
    pool: PoolSampler, session: Session, attempts: list[Attempt], outcomes: list[Outcome]
) -> None:
    """Offer the batch's succeeded requests to the evaluation pool, in its transaction."""
    pool.sample(
        session, [a for a, o in zip(attempts, outcomes, strict=True) if o is Outcome.SUCCEEDED]
    )
