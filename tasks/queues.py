"""Every queue inferq uses, named in one place (Celery must not invent any others), and how
many messages wait on them."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from celery import Celery

MODEL_QUEUE_PREFIX = "inferq.model."


class FixedQueue(StrEnum):
    WEBHOOKS = "inferq.webhooks"
    MAINTENANCE = "inferq.maintenance"


INTERACTIVE_SUFFIX = ".interactive"


def model_queue(model: str) -> str:
    """The queue a model's workers consume: one per configured model (batch work; see
    ``interactive_queue``)."""
    return f"{MODEL_QUEUE_PREFIX}{model}"


def interactive_queue(queue: str) -> str:
    """A model queue's interactive twin. A worker consumes it on a channel of its own, so an
    interactive request is fetched at once however much batch work the worker already holds
    (a priority within one queue orders what is fetched, not when)."""
    return f"{queue}{INTERACTIVE_SUFFIX}"


def model_queues(model: str) -> tuple[str, str]:
    """Both queues of a model: batch, interactive."""
    queue = model_queue(model)
    return queue, interactive_queue(queue)


def queue_depths(app: Celery, models: Iterable[str]) -> dict[str, int]:
    """Messages (bundles of requests) waiting on each model's two queues, as the broker's
    transport counts them: every priority list, under the key prefix. What routing compares
    with a route's ``max_queue_depth`` and what ``/metrics`` exports.

    One connection attempt: a broker that is away raises ``kombu``'s ``OperationalError`` at
    once rather than after the publish path's retries.
    """
    with app.pool.acquire(block=True) as connection:
        connection.ensure_connection(max_retries=0)
        channel = connection.default_channel
        return {
            model: sum(
                int(channel.queue_declare(queue=q).message_count) for q in model_queues(model)
            )
            for model in models
        }
