"""In-process workers for the embedded default: the same runtimes and consumer, with the
Celery worker on a thread of this process."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

from celery.contrib.testing.worker import start_worker
from sqlalchemy.orm import Session, sessionmaker

from inferq.settings import Settings
from router.config import RouterConfig
from tasks.app import InferqCelery
from tasks.queues import FixedQueue
from workers.consumer import serve
from workers.runtime import WorkerRuntime
from workers.webhooks import WebhookSender


@contextmanager
def embedded_workers(
    settings: Settings,
    config: RouterConfig,
    celery: InferqCelery,
    sessions: sessionmaker[Session],
    *,
    models: Sequence[str] | None = None,
) -> Iterator[dict[str, WorkerRuntime]]:
    """Run an engine per model and one Celery worker feeding them (and delivering webhooks),
    until the block ends."""
    with ExitStack() as stack:
        runtimes = {}
        for model in models or list(config.models):
            runtime = WorkerRuntime.create(settings, config, model, sessions, celery)
            runtime.start()
            stack.callback(runtime.stop)
            runtimes[model] = runtime
        serve(celery, runtimes)
        stack.callback(celery.runtimes.clear)
        celery.webhook_sender = WebhookSender(settings, sessions)
        stack.callback(celery.webhook_sender.close)
        stack.enter_context(
            start_worker(
                celery,
                pool="threads",
                concurrency=4,
                queues=[FixedQueue.MAINTENANCE.value, FixedQueue.WEBHOOKS.value],
                perform_ping_check=False,
                loglevel="WARNING",
                shutdown_timeout=60.0,
                hostname="embedded@inferq",
            )
        )
        yield runtimes
