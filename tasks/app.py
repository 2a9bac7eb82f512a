"""The Celery app factory: queue topology and delivery guarantees, decided here once; and
publishing requests on their models' queues.

The app holds no worker objects: a process that consumes a queue registers its tasks, and
hands the consumer step what it feeds (``workers.consumer``, ``workers.webhook_worker``,
``quality.scheduled``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import Celery
from kombu import Queue

from core.enums import Priority
from core.settings import Settings
from router.config import RouterConfig
from tasks.broker_redis import transport_options
from tasks.contract import RUN_TASK_NAME, RunMessage
from tasks.queues import FixedQueue, interactive_queue, model_queue, model_queues

# Kombu's Redis transport serves lower numbers first.
_PRIORITY = {Priority.INTERACTIVE: 0, Priority.BATCH: 6}


class PublishError(Exception):
    """Some models' messages could not be published; ``unsent`` holds them."""

    def __init__(self, unsent: list[RunMessage], failures: dict[str, Exception]) -> None:
        why = "; ".join(f"{model}: {exc!r}" for model, exc in failures.items())
        super().__init__(f"publishing {len(unsent)} requests failed ({why})")
        self.unsent = unsent


def create_celery(settings: Settings, config: RouterConfig) -> Celery:
    """Build the Celery app for these settings and this models-and-routes config."""
    app = Celery("inferq", broker=settings.broker_url, set_as_current=False)
    queues = [Queue(q) for name in config.models for q in model_queues(name)]
    queues += [Queue(q.value) for q in FixedQueue]
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,  # results land in Postgres, written a batch at a time
        task_queues=queues,
        task_default_queue=FixedQueue.MAINTENANCE.value,
        task_create_missing_queues=False,  # a misspelt queue fails loudly
        # Model queues are consumed by workers.consumer, which acknowledges a message only
        # after its batch is committed and prefetches one batch running plus one filling.
        # Other tasks (maintenance) get the same guarantees from Celery itself:
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            # Longer than any message waits in a buffer plus the longest batch, or Redis
            # hands running work to a second worker.
            "visibility_timeout": settings.visibility_timeout_s,
            "queue_order_strategy": "priority",
            **(
                {"global_keyprefix": settings.broker_key_prefix}
                if settings.broker_key_prefix
                else {}
            ),
            **transport_options(settings),  # Redis Sentinel's master name
        },
        broker_connection_retry_on_startup=True,
        worker_send_task_events=settings.task_events,  # Flower's per-task view
        # No task-sent events: one more Redis publish per request on the API's hot path.
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
    )
    return app


def publish_runs(app: Celery, config: RouterConfig, messages: Sequence[RunMessage]) -> None:
    """Publish committed requests, each on its model's queue (interactive ones on its
    interactive twin): one broker message per bundle of up to the model's ``max_batch_size``
    requests of one priority, so a burst costs the broker (and the worker's consumer) a
    message per bundle rather than per request.

    Raises:
        PublishError: some models' bundles could not be sent (every model is tried); the
            caller leaves their requests to the reconciler.
    """
    groups: dict[tuple[str, Priority], list[RunMessage]] = {}
    for message in messages:
        groups.setdefault((message.model, message.priority), []).append(message)
    unsent: list[RunMessage] = []
    failures: dict[str, Exception] = {}
    try:
        with app.producer_or_acquire() as producer:
            for (model, priority), group in groups.items():
                if model not in failures:
                    try:
                        size = config.models[model].max_batch_size
                        _send(app, producer, model_queue(model), priority, group, size)
                        continue
                    except Exception as exc:
                        failures[model] = exc
                unsent += group
    except Exception as exc:  # no producer to publish with at all
        failures["broker"], unsent = exc, list(messages)
    if failures:
        raise PublishError(unsent, failures)


def _send(
    app: Celery,
    producer: Any,
    queue: str,
    priority: Priority,
    group: list[RunMessage],
    size: int,
) -> None:
    """One priority's requests of one model, ``size`` to a broker message."""
    for start in range(0, len(group), size):
        bundle = [m.to_wire() for m in group[start : start + size]]
        app.send_task(
            RUN_TASK_NAME,
            args=[bundle],
            argsrepr=f"[<{len(bundle)} requests>]",  # not a repr of every request
            queue=interactive_queue(queue) if priority is Priority.INTERACTIVE else queue,
            priority=_PRIORITY[priority],
            producer=producer,
        )
