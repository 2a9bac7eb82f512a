"""What a worker tells remote control (``celery inspect``, Flower) about the queues it consumes.

Celery's ``active_queues`` lists only its own task consumer's queues (here the maintenance
queue), not the model queues ``workers.consumer`` consumes with a consumer of its own. Flower
takes the queues it measures on its Broker page and ``/api/queues/length`` from the workers'
``active_queues``, so without this it shows no model queue at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from kombu.entity import Queue

# The consumer blueprint's remote-control step, which owns this worker's mailbox node.
_CONTROL_STEP = "celery.worker.consumer.control.Control"


def report_queues(c: Any, queues: Sequence[Queue]) -> None:
    """Make this worker's ``active_queues`` answer list ``queues`` too.

    The mailbox node is given a handler table of its own: Celery's is shared by every worker
    in the process, and the other commands stay Celery's. No-op where remote control is off.
    """
    step = c.blueprint.steps.get(_CONTROL_STEP)
    if step is None:  # worker_enable_remote_control=False, or a transport without fanout
        return
    node = step.box.node
    celery_active_queues = node.handlers["active_queues"]
    node.handlers = {
        **node.handlers,
        "active_queues": partial(_active_queues, celery_active_queues, tuple(queues)),
    }


def _active_queues(
    celery_active_queues: Any, queues: tuple[Queue, ...], state: Any, **kwargs: Any
) -> list[dict[str, Any]]:
    """Runs on the worker's event loop: reads queue declarations, never waits on the engine."""
    listed: list[dict[str, Any]] = celery_active_queues(state, **kwargs)
    names = {q["name"] for q in listed}
    ours = [dict(q.as_dict(recurse=True)) for q in queues if q.name not in names]  # type: ignore[no-untyped-call]
    return listed + ours
