"""The webhook worker process: consumes only the webhooks queue, on threads (I/O bound).

A slow receiver holds a thread for at most the attempt deadline, and each endpoint at most
``webhook_endpoint_concurrency`` threads; ``webhook_concurrency`` threads leave room for the rest.
"""

from __future__ import annotations

import socket

from inferq.settings import Settings
from router import load_config
from storage.db import make_engine, make_sessionmaker
from tasks.app import create_celery
from tasks.queues import FixedQueue
from workers.webhooks import WebhookSender


def run_webhook_worker(settings: Settings, *, loglevel: str = "INFO") -> None:
    """Deliver webhooks until stopped; the sender and its pools are built here, once."""
    app = create_celery(settings, load_config(settings.config))
    engine = make_engine(settings.database_url)
    sender = WebhookSender(settings, make_sessionmaker(engine))
    app.webhook_sender = sender
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
