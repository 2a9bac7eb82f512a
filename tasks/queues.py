"""Every queue inferq uses, named in one place. Celery must not invent any others."""

from __future__ import annotations

from enum import StrEnum

MODEL_QUEUE_PREFIX = "inferq.model."


class FixedQueue(StrEnum):
    WEBHOOKS = "inferq.webhooks"
    MAINTENANCE = "inferq.maintenance"


def model_queue(model: str) -> str:
    """The queue a model's workers consume: one per configured model."""
    return f"{MODEL_QUEUE_PREFIX}{model}"
