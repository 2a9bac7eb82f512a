"""What each worker holds, kept in Redis beside its messages, so that a killed worker's
prefetched requests run again within seconds rather than after the queued lease.

A message a worker has received stays in Redis's unacknowledged set until the visibility
timeout (an hour), and the broker does not say which worker holds it. So each worker keeps
the ids of the requests it holds (received, not finished) in a set of its own and beats a
heartbeat beside it; the reconciler takes the set of a worker whose heartbeat is older than
``DEAD_AFTER_S`` and sends its requests that are still queued again at once
(``maintenance.reconciler``). Running ones are left to their running lease: a worker only
presumed dead (a slow link to Redis) may still be running them, and the lease says when it
stopped vouching for them.

Safe against double runs: a re-published request runs only if it is claimed, a claim takes
a queued request once (``storage.ledger.claim``), and if it ever ran twice the first success
wins and the second is a duplicate in the ledger. Keys go through the broker's own client,
so the broker's key prefix and transport options apply.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery

HOLDERS_KEY = "inferq.holders"  # sorted set: holder -> its last heartbeat (Redis time)
HEARTBEAT_S = 2.0
DEAD_AFTER_S = 10.0


def held_key(holder: str) -> str:
    return f"inferq.held.{holder}"


@contextmanager
def redis_client(app: Celery) -> Iterator[Any | None]:
    """The broker's Redis client, or None for another transport (the embedded broker)."""
    with app.connection_for_write() as connection:
        if connection.transport.driver_type != "redis":
            yield None
            return
        with connection.default_channel.conn_or_acquire() as client:
            yield client


def _now(client: Any) -> float:
    seconds, micros = client.time()
    return float(seconds) + float(micros) / 1e6


def beat(client: Any, holder: str, *, add: Collection[str], remove: Collection[str]) -> None:
    """Record what ``holder`` took and let go of, and that it is alive."""
    pipe = client.pipeline(transaction=False)
    if add:
        pipe.sadd(held_key(holder), *add)
    if remove:
        pipe.srem(held_key(holder), *remove)
    pipe.zadd(HOLDERS_KEY, {holder: _now(client)})
    pipe.execute()


def leave(client: Any, holder: str) -> None:
    """``holder`` stopped holding anything (a clean exit)."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(held_key(holder))
    pipe.zrem(HOLDERS_KEY, holder)
    pipe.execute()


def take_dead(client: Any, *, dead_after_s: float = DEAD_AFTER_S) -> list[uuid.UUID]:
    """The requests held by workers silent for ``dead_after_s``; their sets are removed, so
    of several reconcilers only one takes each."""
    holders = client.zrange(HOLDERS_KEY, "-inf", _now(client) - dead_after_s, byscore=True)
    taken: list[uuid.UUID] = []
    for raw in holders:
        holder = raw.decode() if isinstance(raw, bytes) else str(raw)
        pipe = client.pipeline(transaction=True)
        pipe.smembers(held_key(holder))
        pipe.delete(held_key(holder))
        pipe.zrem(HOLDERS_KEY, holder)
        members, _deleted, removed = pipe.execute()
        if removed:
            taken += [uuid.UUID(m.decode() if isinstance(m, bytes) else m) for m in members]
    return taken
