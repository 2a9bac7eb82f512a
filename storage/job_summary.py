"""One job's figures from its request rows and ledger: counts, tokens, latency, cost."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.enums import RequestStatus
from storage.ledger_stats import percentile
from storage.tables import LedgerEntry, Request, as_utc


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
