"""Deadline-aware escalation: a request that its model cannot start before its deadline goes
down its route's chain at once (``fallback_reason`` names the deadline) instead of expiring in
the queue.

When a model would start a request is estimated from two things Postgres already holds: the
requests waiting for it (what this one waits behind: interactive work waits only behind
interactive work) and the rate its workers finished requests over the last minute (successes in
the ledger, over the time since the first of them, at least ``_MIN_SPAN_S``). Both are read at
most every ``_CACHE_S`` seconds, whatever the traffic.

A cold model (no success in the last minute) has no rate, and a guess would send work away
that it could have served. It keeps the request unless something already waits for it and the
oldest waiting request has waited longer than this request's deadline: that much is measured,
and means this one would expire too. Requests without a deadline are never moved here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.enums import Outcome, Priority, RequestStatus
from router import Route
from storage.tables import LedgerEntry, Request, as_utc, utcnow

_CACHE_S = 2.0
_RATE_WINDOW_S = 60.0
_MIN_SPAN_S = 5.0


@dataclass(frozen=True, slots=True)
class Waiting:
    count: int
    oldest: datetime | None


class StartEstimator:
    """When each model would start a new request, from its queue and its recent rate."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._lock = threading.Lock()
        self._seen: tuple[float, dict[tuple[str, Priority], Waiting], dict[str, float]] = (
            0.0,
            {},
            {},
        )

    def late(self, model: str, priority: Priority, deadline_s: float) -> str | None:
        """Why ``model`` would not start a request of ``priority`` within ``deadline_s``."""
        waiting, rates = self._read()
        queued = _behind(waiting, model, priority)
        if not queued.count:
            return None
        rate = rates.get(model)
        if rate:
            start_s = queued.count / rate
            if start_s <= deadline_s:
                return None
            return (
                f"deadline: would start in ~{start_s:.1f}s ({queued.count} waiting, "
                f"{rate:.2f}/s done over the last minute), after its deadline of {deadline_s:g}s"
            )
        if queued.oldest is None:
            return None
        age_s = (utcnow() - as_utc(queued.oldest)).total_seconds()
        if age_s <= deadline_s:
            return None
        return (
            f"deadline: nothing finished in the last minute and the oldest of "
            f"{queued.count} waiting has waited {age_s:.1f}s, past its deadline of {deadline_s:g}s"
        )

    def _read(self) -> tuple[dict[tuple[str, Priority], Waiting], dict[str, float]]:
        with self._lock:
            at, waiting, rates = self._seen
            if time.monotonic() - at < _CACHE_S:
                return waiting, rates
        now = utcnow()
        since = now - timedelta(seconds=_RATE_WINDOW_S)
        with self._sessions() as session:
            waiting = {
                (model, priority): Waiting(int(count), oldest)
                for model, priority, count, oldest in session.execute(
                    select(
                        Request.model,
                        Request.priority,
                        func.count(),
                        func.min(Request.queued_at),
                    )
                    .where(Request.status == RequestStatus.QUEUED)
                    .group_by(Request.model, Request.priority)
                )
            }
            rates = {}
            for model, count, first in session.execute(
                select(LedgerEntry.model, func.count(), func.min(LedgerEntry.created_at))
                .where(LedgerEntry.outcome == Outcome.SUCCEEDED, LedgerEntry.created_at >= since)
                .group_by(LedgerEntry.model)
            ):
                span = min(max((now - as_utc(first)).total_seconds(), _MIN_SPAN_S), _RATE_WINDOW_S)
                rates[model] = int(count) / span
        with self._lock:
            self._seen = (time.monotonic(), waiting, rates)
        return waiting, rates


def _behind(
    waiting: dict[tuple[str, Priority], Waiting], model: str, priority: Priority
) -> Waiting:
    """What a new request waits behind: interactive work runs first, so an interactive request
    waits only behind interactive ones; bulk work waits behind everything."""
    picked = [
        seen
        for (name, level), seen in waiting.items()
        if name == model and (priority is not Priority.INTERACTIVE or level is priority)
    ]
    oldest = [seen.oldest for seen in picked if seen.oldest is not None]
    return Waiting(sum(seen.count for seen in picked), min(oldest) if oldest else None)


def escalate(chosen: Route, late: Callable[[str], str | None]) -> Route:
    """Walk down the chain past models that would start the request after its deadline; the
    chain's last model takes it whatever its queue (there is nothing else to try)."""
    while chosen.fallbacks and (why := late(chosen.model)) is not None:
        chosen = chosen.next(why) or chosen
    return chosen
