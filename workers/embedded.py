"""In-process workers for the embedded default: same runtime, a Celery worker on a thread."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

from celery.contrib.testing.worker import start_worker
from sqlalchemy.orm import Session, sessionmaker

from inferq.settings import Settings
from router.config import RouterConfig
from tasks.app import InferqCelery
from tasks.queues import model_queue
from workers.runtime import WorkerRuntime


@contextmanager
def embedded_workers(
    settings: Settings,
    config: RouterConfig,
    celery: InferqCelery,
    sessions: sessionmaker[Session],
    *,
    models: Sequence[str] | None = None,
) -> Iterator[dict[str, WorkerRuntime]]:
    """Run one worker per model inside this process until the block ends."""
    with ExitStack() as stack:
        for model in models or list(config.models):
            runtime = WorkerRuntime.create(settings, config, model, sessions)
            runtime.start()
            stack.callback(runtime.stop)
            celery.runtimes[model] = runtime
            stack.callback(celery.runtimes.pop, model, None)
            stack.enter_context(
                start_worker(
                    celery,
                    pool="threads",
                    concurrency=runtime.concurrency,
                    queues=[model_queue(model)],
                    perform_ping_check=False,
                    loglevel="WARNING",
                    shutdown_timeout=60.0,
                    hostname=f"{model}@embedded",
                )
            )
        yield dict(celery.runtimes)
