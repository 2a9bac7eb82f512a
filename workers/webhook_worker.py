"""The webhook worker process: consumes only the webhooks queue, on threads (I/O bound).

A slow receiver holds a thread for at most the attempt deadline, and each endpoint at most
``webhook_endpoint_concurrency`` threads; ``webhook_concurrency`` threads leave room for the rest.
The delivery task is registered here, with the sender it calls, by the processes that consume
the queue (this one, and the embedded workers).
"""

from __future__ import annotations

import socket
import uuid
from typing import Any

from celery import Celery

from core.settings import Settings
from router import load_config
from storage.db import make_engine, make_sessionmaker
from tasks.app import create_celery
from tasks.queues import FixedQueue
from tasks.webhooks import DELIVER_TASK
from workers.webhooks import WebhookSender


def register_delivery(app: Celery, sender: WebhookSender) -> None:
    """Register the delivery task: one attempt, then a retry by re-publishing itself."""

    @app.task(  # type: ignore[untyped-decorator]
        name=DELIVER_TASK,
        bind=True,
        queue=FixedQueue.WEBHOOKS.value,
        acks_late=True,  # a worker lost mid-attempt leaves the message for another
        ignore_result=True,
    )
    def deliver(task: Any, delivery_id: str, attempt: int) -> None:
        step = sender.step(uuid.UUID(delivery_id), attempt)
        if step is not None:
            task.apply_async(args=[delivery_id, step.attempt], countdown=step.countdown)


def run_webhook_worker(settings: Settings, *, loglevel: str = "INFO") -> None:
    """Deliver webhooks until stopped; the sender and its pools are built here, once."""
    app = create_celery(settings, load_config(settings.config))
    engine = make_engine(settings.database_url)
    sender = WebhookSender(settings, make_sessionmaker(engine))
    register_delivery(app, sender)
    try:
        app.Worker(
            queues=[FixedQueue.WEBHOOKS.value],
            pool="threads",
            concurrency=settings.webhook_concurrency,
            hostname=f"webhooks@{socket.gethostname()}",  # "%h" is expanded only by celery's CLI
            loglevel=loglevel,
        ).start()
    finally:
        sender.close()
        engine.dispose()
