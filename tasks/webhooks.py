"""The webhook delivery task's contract: its name, its queue, and sending first attempts.

Messages carry only ``[delivery_id, attempt]``; Postgres holds the rest. The task itself is
registered, with the sender it calls, by the process that consumes ``FixedQueue.WEBHOOKS``
(``workers.webhook_worker``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from celery import Celery

from tasks.queues import FixedQueue

DELIVER_TASK = "inferq.webhooks.deliver"


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
