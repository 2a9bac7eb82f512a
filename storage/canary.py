"""Canary decisions and the figures of a canary's two arms, from the requests and the ledger.

A decision (promote or abort) is a row, never an edit of the config file: the processes that
load the config overlay the latest decision per route (``router.canary.apply_decisions``), and
watch :func:`decisions_mark` to notice a new one cheaply.

The arms' figures, over ``[since, now)`` by the request's creation time: requests taken,
successes, failures (finished without success), fallbacks (the request left the model its arm
routed it to), cost per successful inference (the cost of every attempt of the arm's requests
÷ its successes, as ``storage.ledger_stats`` defines it), end-to-end latency of successful
requests (``finished_at - created_at``) and the engine's time to first token, nearest rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Index, Integer, String, Text, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from core.enums import OPEN_STATUSES, RequestStatus
from storage.ledger_stats import percentile
from storage.tables import Base, LedgerEntry, Request, as_utc, utcnow

ARMS = ("control", "candidate")


class CanaryDecision(Base):
    """``promote`` or ``abort`` of one candidate on one route; the latest per route counts."""

    __tablename__ = "canary_decisions"
    __table_args__ = (Index("ix_canary_decisions_route", "route", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    route: Mapped[str] = mapped_column(String(100))
    candidate: Mapped[str] = mapped_column(String(200))
    control: Mapped[str] = mapped_column(String(200))  # the route's model when decided
    verdict: Mapped[str] = mapped_column(String(16))
    decided_by: Mapped[str] = mapped_column(String(16))  # "cli" or "policy"
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


def record_decision(
    session: Session,
    *,
    route: str,
    candidate: str,
    control: str,
    verdict: str,
    decided_by: str,
    reason: str | None = None,
) -> CanaryDecision:
    """Add a decision in the caller's transaction."""
    row = CanaryDecision(
        route=route,
        candidate=candidate,
        control=control,
        verdict=verdict,
        decided_by=decided_by,
        reason=reason,
    )
    session.add(row)
    session.flush()
    return row


def latest_decisions(session: Session) -> list[CanaryDecision]:
    """The latest decision of each route."""
    newest = select(func.max(CanaryDecision.id)).group_by(CanaryDecision.route)
    rows = session.scalars(select(CanaryDecision).where(CanaryDecision.id.in_(newest)))
    return list(rows)


def decisions_mark(session: Session) -> int:
    """The newest decision's id (0 for none): it changes exactly when a decision is recorded."""
    return int(session.scalar(select(func.coalesce(func.max(CanaryDecision.id), 0))) or 0)


@dataclass(frozen=True, slots=True)
class ArmStats:
    arm: str
    models: dict[str, int]  # model that served -> requests
    requests: int
    succeeded: int
    failed: int
    open: int
    fallbacks: int
    cost: float
    latency_p50_s: float
    latency_p95_s: float
    ttft_p50_s: float
    ttft_p95_s: float

    @property
    def finished(self) -> int:
        return self.requests - self.open

    @property
    def failure_rate(self) -> float:
        return self.failed / self.finished if self.finished else 0.0

    @property
    def fallback_rate(self) -> float:
        return self.fallbacks / self.requests if self.requests else 0.0

    @property
    def cost_per_success(self) -> float | None:
        return self.cost / self.succeeded if self.succeeded else None


def arm_stats(session: Session, route: str, since: datetime) -> dict[str, ArmStats]:
    """Both arms of ``route`` over requests created since ``since`` (see the module docstring)."""
    rows = session.execute(
        select(
            Request.id,
            Request.canary_arm,
            Request.status,
            Request.model,
            Request.first_model,
            Request.fallback_reason,
            Request.created_at,
            Request.finished_at,
        ).where(Request.canary_route == route, Request.created_at >= since)
    ).all()
    ids = [row.id for row in rows]
    cost: dict[object, float] = {}
    ttft: dict[object, list[float]] = {}
    for start in range(0, len(ids), 5000):
        chunk = ids[start : start + 5000]
        ledger = session.execute(
            select(LedgerEntry.request_id, LedgerEntry.cost, LedgerEntry.ttft_s).where(
                LedgerEntry.request_id.in_(chunk)
            )
        )
        for request_id, attempt_cost, first_token in ledger:
            cost[request_id] = cost.get(request_id, 0.0) + float(attempt_cost)
            if first_token is not None:
                ttft.setdefault(request_id, []).append(float(first_token))
    return {
        arm: _one_arm(arm, [r for r in rows if r.canary_arm == arm], cost, ttft) for arm in ARMS
    }


def _one_arm(
    arm: str, rows: list[Any], cost: dict[object, float], ttft: dict[object, list[float]]
) -> ArmStats:
    models: dict[str, int] = {}
    latencies: list[float] = []
    firsts: list[float] = []
    succeeded = failed = open_ = fallbacks = 0
    for row in rows:
        models[row.model] = models.get(row.model, 0) + 1
        if row.status in OPEN_STATUSES:
            open_ += 1
        elif row.status is RequestStatus.SUCCEEDED:
            succeeded += 1
            if row.finished_at is not None:
                latencies.append((as_utc(row.finished_at) - as_utc(row.created_at)).total_seconds())
            firsts.extend(ttft.get(row.id, ()))
        else:
            failed += 1
        if row.fallback_reason is not None or (row.first_model and row.first_model != row.model):
            fallbacks += 1
    latencies.sort()
    firsts.sort()
    return ArmStats(
        arm=arm,
        models=models,
        requests=len(rows),
        succeeded=succeeded,
        failed=failed,
        open=open_,
        fallbacks=fallbacks,
        cost=sum(cost.get(row.id, 0.0) for row in rows),
        latency_p50_s=percentile(latencies, 50),
        latency_p95_s=percentile(latencies, 95),
        ttft_p50_s=percentile(firsts, 50),
        ttft_p95_s=percentile(firsts, 95),
    )
