"""Every queue inferq uses, named in one place. Celery must not invent any others."""

from __future__ import annotations

from enum import StrEnum

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
