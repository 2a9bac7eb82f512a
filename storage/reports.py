"""Figures from the request rows and the ledger: counts, tokens, latency, cost."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from inferq.enums import RequestStatus
from storage.models import LedgerEntry, Request, as_utc


@dataclass(frozen=True, slots=True)
class Summary:
    total: int
    succeeded: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    wall_s: float
    p50_latency_s: float
    p95_latency_s: float
    cost: float
    attempts: int
    mean_batch_size: float

    @property
    def requests_per_s(self) -> float:
        return self.total / self.wall_s if self.wall_s else 0.0

    @property
    def cost_per_success(self) -> float | None:
        """Cost of every attempt, failed and duplicate ones included, per successful request."""
        return self.cost / self.succeeded if self.succeeded else None


def status_counts(session: Session, job_id: uuid.UUID) -> dict[RequestStatus, int]:
    rows = session.execute(
        select(Request.status, func.count())
        .where(Request.job_id == job_id)
        .group_by(Request.status)
    )
    return {status: count for status, count in rows}


def job_summary(session: Session, job_id: uuid.UUID) -> Summary:
    requests = session.execute(
        select(
            Request.status,
            Request.created_at,
            Request.finished_at,
            Request.prompt_tokens,
            Request.completion_tokens,
        ).where(Request.job_id == job_id)
    ).all()
    ledger = session.execute(
        select(
            func.count(),
            func.coalesce(func.sum(LedgerEntry.cost), 0.0),
            func.avg(LedgerEntry.batch_size),
        )
        .join(Request, Request.id == LedgerEntry.request_id)
        .where(Request.job_id == job_id)
    ).one()
    latencies = sorted(
        (as_utc(r.finished_at) - as_utc(r.created_at)).total_seconds()
        for r in requests
        if r.finished_at is not None
    )
    starts = [as_utc(r.created_at) for r in requests]
    ends = [as_utc(r.finished_at) for r in requests if r.finished_at is not None]
    return Summary(
        total=len(requests),
        succeeded=sum(r.status is RequestStatus.SUCCEEDED for r in requests),
        failed=sum(r.status is RequestStatus.FAILED for r in requests),
        prompt_tokens=sum(r.prompt_tokens or 0 for r in requests),
        completion_tokens=sum(r.completion_tokens or 0 for r in requests),
        wall_s=(max(ends) - min(starts)).total_seconds() if ends else 0.0,
        p50_latency_s=percentile(latencies, 50),
        p95_latency_s=percentile(latencies, 95),
        cost=float(ledger[1]),
        attempts=int(ledger[0]),
        mean_batch_size=float(ledger[2] or 0.0),
    )


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values; 0.0 for none."""
    if not sorted_values:
        return 0.0
    rank = max(math.ceil(pct / 100 * len(sorted_values)), 1)
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True, slots=True)
class Percentiles:
    """p50/p95/p99 of one stage's latencies, nearest rank; all 0.0 when there were none."""

    p50: float
    p95: float
    p99: float
    count: int

    @classmethod
    def of(cls, values: list[float]) -> Percentiles:
        ordered = sorted(values)
        return cls(
            p50=percentile(ordered, 50),
            p95=percentile(ordered, 95),
            p99=percentile(ordered, 99),
            count=len(ordered),
        )
