"""In-process workers for the embedded default: the same runtimes and consumer, with the
Celery worker on a thread of this process."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

from celery import Celery
from celery.contrib.testing.worker import start_worker
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from quality import scheduled
from router.config import RouterConfig
from tasks.queues import FixedQueue
from workers.consumer import serve
from workers.runtime import WorkerRuntime
from workers.webhook_worker import register_delivery
from workers.webhooks import WebhookSender


@contextmanager
def embedded_workers(
    settings: Settings,
    config: RouterConfig,
    celery: Celery,
    sessions: sessionmaker[Session],
    *,
    models: Sequence[str] | None = None,
) -> Iterator[dict[str, WorkerRuntime]]:
    """Run an engine per model and one Celery worker feeding them (and delivering webhooks,
    and running the scheduled evaluation), until the block ends."""
    with ExitStack() as stack:
        runtimes = {}
        for model in models or list(config.models):
            runtime = WorkerRuntime.create(settings, config, model, sessions, celery)
            runtime.start()
            stack.callback(runtime.stop)
            runtimes[model] = runtime
        sender = WebhookSender(settings, sessions)
        stack.callback(sender.close)
        register_delivery(celery, sender)
        scheduled.register(celery, settings)
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
                **serve(celery, runtimes),
            )
        )
        yield runtimes
