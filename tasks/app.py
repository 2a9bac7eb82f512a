"""The Celery app factory: queue topology and delivery guarantees, decided here once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from celery import Celery
from kombu import Queue

from inferq.enums import Priority
from inferq.settings import Settings
from router.config import RouterConfig
from tasks.contract import RUN_TASK_NAME, RunMessage
from tasks.eval_schedule import register as register_eval
from tasks.queues import FixedQueue, interactive_queue, model_queue, model_queues
from tasks.webhooks import register as register_webhooks

if TYPE_CHECKING:
    from workers.runtime import WorkerRuntime

# Kombu's Redis transport serves lower numbers first.
_PRIORITY = {Priority.INTERACTIVE: 0, Priority.BATCH: 6}


class InferqCelery(Celery):  # type: ignore[misc]
    """A Celery app that carries this process's worker runtimes (engine + batcher) by model."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runtimes: dict[str, WorkerRuntime] = {}


def create_celery(settings: Settings, config: RouterConfig) -> InferqCelery:
    """Build the Celery app for these settings and this models-and-routes config."""
    app = InferqCelery("inferq", broker=settings.broker_url, set_as_current=False)
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
        },
        broker_connection_retry_on_startup=True,
        worker_send_task_events=settings.task_events,  # Flower's per-task view
        # No task-sent events: one more Redis publish per request on the API's hot path.
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
    )
    register_webhooks(app)
    register_eval(app, settings)
    return app


def publish(app: Celery, messages: list[RunMessage], *, queue: str, bundle_size: int) -> None:
    """Publish committed requests on a model's queue (interactive ones on its interactive
    twin): one broker message per bundle of up to ``bundle_size`` requests of one priority, so
    a burst costs the broker (and the worker's consumer) a message per bundle rather than per
    request."""
    by_priority: dict[Priority, list[RunMessage]] = {}
    for message in messages:
        by_priority.setdefault(message.priority, []).append(message)
    with app.producer_or_acquire() as producer:
        for priority, group in by_priority.items():
            for start in range(0, len(group), bundle_size):
                bundle = [m.to_wire() for m in group[start : start + bundle_size]]
                app.send_task(
                    RUN_TASK_NAME,
                    args=[bundle],
                    argsrepr=f"[<{len(bundle)} requests>]",  # not a repr of every request
                    queue=interactive_queue(queue) if priority is Priority.INTERACTIVE else queue,
                    priority=_PRIORITY[priority],
                    producer=producer,
                )


def publish_by_model(app: Celery, config: RouterConfig, messages: Sequence[RunMessage]) -> None:
    """Publish requests of any models, each on its model's queue, bundled per model."""
    by_model: dict[str, list[RunMessage]] = {}
    for message in messages:
        by_model.setdefault(message.model, []).append(message)
    for model, group in by_model.items():
        bundle_size = config.models[model].max_batch_size
        publish(app, group, queue=model_queue(model), bundle_size=bundle_size)
