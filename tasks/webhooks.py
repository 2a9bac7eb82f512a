"""The webhook delivery task: a thin wrapper that retries by re-publishing itself.

Messages carry only ``[delivery_id, attempt]``; Postgres holds the rest. The sender is
attached to the app by the process that consumes ``FixedQueue.WEBHOOKS`` (see
``workers.webhook_worker``), as model workers attach ``app.runtimes``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from tasks.queues import FixedQueue

if TYPE_CHECKING:
    from celery import Celery

    from workers.webhooks import WebhookSender

DELIVER_TASK = "inferq.webhooks.deliver"


def register(app: Celery) -> None:
    """Register the delivery task on ``app`` (called by ``tasks.app.create_celery``)."""

    @app.task(  # type: ignore[untyped-decorator]
        name=DELIVER_TASK,
        bind=True,
        queue=FixedQueue.WEBHOOKS.value,
        acks_late=True,  # a worker lost mid-attempt leaves the message for another
        ignore_result=True,
    )
    def deliver(task: Any, delivery_id: str, attempt: int) -> None:
        sender: WebhookSender = task.app.webhook_sender
        step = sender.step(uuid.UUID(delivery_id), attempt)
        if step is not None:
            task.apply_async(args=[delivery_id, step.attempt], countdown=step.countdown)


def publish_deliveries(app: Celery, ids: Iterable[uuid.UUID]) -> None:
    """Send first attempts for deliveries the caller has just committed (never before).

    Args:
        app: The process's Celery app.
        ids: Ids returned by ``storage.webhooks.enqueue_delivery`` (or reset for a replay).
    """
    ids = list(ids)
    if not ids:
        return
    with app.producer_or_acquire() as producer:
        for delivery_id in ids:
            app.send_task(
                DELIVER_TASK,
                args=[str(delivery_id), 0],
                queue=FixedQueue.WEBHOOKS.value,
                producer=producer,
            )
