"""Scale down without losing or stalling work: on SIGTERM a worker takes no more messages,
hands back at once what it holds but has not started, lets its engine finish what it runs
within a grace period, commits, acknowledges and exits (``workers.consumer`` drives it).

Handing back puts a request on ``queued`` with a fresh lease and publishes it again, so
another worker runs it now rather than after a lease; then its message is acknowledged. A
request that finished or that another worker claimed meanwhile is only acknowledged. If the
publish fails, the lease is cleared and the reconciler sends it on its next pass.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from core.enums import Outcome
from core.settings import Settings
from router.config import ModelSpec
from tasks.app import PublishError
from tasks.contract import RunMessage
from workers.batcher import WorkItem
from workers.leases import Leases

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 120.0


def drain_grace_s(settings: Settings, spec: ModelSpec) -> float:
    """How long a stopping worker lets its engine finish: ``drain_grace_s``, else the model's
    ``timeout_s`` (a request running longer times out anyway), else 120 s."""
    return settings.drain_grace_s or spec.timeout_s or DEFAULT_GRACE_S


def hand_back(
    items: list[WorkItem],
    *,
    leases: Leases,
    publish: Callable[[list[RunMessage]], None] | None,
    ran: bool,
) -> int:
    """Requeue and publish again what ``items`` carry, then settle them (their messages are
    acknowledged). Returns how many went back on their queues."""
    if not items:
        return 0
    ids = [uuid.UUID(item.message.request_id) for item in items]
    try:
        requeued = leases.hand_back(ids, ran=ran)
    except Exception as exc:  # the database is away: the messages and leases bring them back
        log.warning("handing back %d requests failed", len(items), exc_info=True)
        for item in items:
            if not item.future.done():
                item.future.set_exception(exc)
        return 0
    messages = [i.message for i in items if uuid.UUID(i.message.request_id) in requeued]
    if messages:
        try:
            if publish is None:
                raise PublishError(messages, {})
            publish(messages)
        except PublishError as exc:
            log.warning("publishing handed-back requests failed: %s", exc)
            leases.forget_published([uuid.UUID(m.request_id) for m in exc.unsent])
    for item in items:
        if not item.future.done():
            item.future.set_result(Outcome.CANCELLED)  # settled unrun here
    return len(messages)
