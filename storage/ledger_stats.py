"""The four numbers from the ledger: latency by stage, throughput at P95, cost per success, waste.

Definitions, so that the numbers mean one thing wherever they are shown:

- The window is ``[since, until)``; an attempt belongs to it when its ledger row was written
  (the attempt finished) inside it.
- A successful request is a ledger row with outcome ``succeeded``. The result write is
  conditional (first success wins), so a request succeeds at most once; later executions are
  ``duplicate`` rows.
- End-to-end latency is ``finished_at - created_at`` of each successful request (requests
  table). Queue wait, engine time and time to first token come from every attempt that ran.
  Time to first token is shown twice: ``ttft`` is the engine's own figure (from the engine
  call), ``client_ttft`` runs from the request's commit to its first token leaving the worker,
  queue included: what a client waits. Percentiles are nearest rank.
- ``throughput`` is successful requests per second over the whole window (the report fits the
  window to its data first). Throughput at P95 latency is per time bucket, next to the bucket's
  p95, with the best rate within a latency target as its headline: :mod:`storage.throughput`.
- Cost per successful inference is the cost of every attempt in the window divided by the
  successful requests in it. What the same successful work would cost elsewhere prices the
  successful attempts' tokens (``ok_prompt_tokens``, ``ok_completion_tokens``) per token.
- Every attempt falls in exactly one spend class: ``succeeded`` (useful), ``failed`` (it failed
  and its request has not succeeded), ``retried`` (it failed but its request has succeeded
  since), ``timed_out``, ``duplicate``, ``cancelled``. Shares are of cost, so the useful share
  and the waste shares add up to 1. ``retried`` and ``failed`` read the request's status when
  the report runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from core.enums import Outcome, RequestStatus
from storage.tables import LedgerEntry, Request, Tenant, as_utc


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


class GroupBy(StrEnum):
    MODEL = "model"
    TASK = "task"
    TENANT = "tenant"


class Spend(StrEnum):
    """Where an attempt's cost went; every class but ``succeeded`` is waste."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRIED = "retried"
    TIMED_OUT = "timed_out"
    DUPLICATE = "duplicate"
    CANCELLED = "cancelled"


WASTE = tuple(s for s in Spend if s is not Spend.SUCCEEDED)


@dataclass(frozen=True, slots=True)
class Window:
    since: datetime
    until: datetime

    @property
    def seconds(self) -> float:
        return max((self.until - self.since).total_seconds(), 0.0)


@dataclass(frozen=True, slots=True)
class AttemptRow:
    """One ledger row with what the report needs from its request and tenant."""

    model: str
    task: str
    tenant: str
    spend: Spend
    cost: float
    gpu_seconds: float
    prompt_tokens: int
    completion_tokens: int
    queue_wait_s: float
    engine_s: float
    ttft_s: float | None
    client_ttft_s: float | None
    at: datetime
    end_to_end_s: float | None  # set on the successful attempt only


@dataclass(frozen=True, slots=True)
class GroupStats:
    key: str
    attempts: int
    successes: int
    prompt_tokens: int
    completion_tokens: int
    gpu_seconds: float
    cost: float
    window_s: float
    ok_prompt_tokens: int
    ok_completion_tokens: int
    end_to_end: Percentiles
    queue_wait: Percentiles
    engine: Percentiles
    ttft: Percentiles
    client_ttft: Percentiles
    cost_by_spend: dict[Spend, float]
    count_by_spend: dict[Spend, int]

    @property
    def throughput(self) -> float:
        """Successful requests per second over the window (read with ``end_to_end.p95``)."""
        return self.successes / self.window_s if self.window_s else 0.0

    @property
    def cost_per_success(self) -> float | None:
        return self.cost / self.successes if self.successes else None

    def share(self, spend: Spend) -> float | None:
        """This class's share of the cost; None when nothing cost anything."""
        return self.cost_by_spend[spend] / self.cost if self.cost else None

    @property
    def waste_share(self) -> float | None:
        return (self.cost - self.cost_by_spend[Spend.SUCCEEDED]) / self.cost if self.cost else None

    def priced_per_token(self, input_per_million: float, output_per_million: float) -> float:
        """What the successful attempts' tokens cost at per-million-token prices (no waste)."""
        prompt = self.ok_prompt_tokens * input_per_million
        return (prompt + self.ok_completion_tokens * output_per_million) / 1_000_000


@dataclass(slots=True)
class _Acc:
    rows: list[AttemptRow] = field(default_factory=list)

    def freeze(self, key: str, window_s: float) -> GroupStats:
        rows = self.rows
        cost_by = dict.fromkeys(Spend, 0.0)
        count_by = dict.fromkeys(Spend, 0)
        for r in rows:
            cost_by[r.spend] += r.cost
            count_by[r.spend] += 1
        return GroupStats(
            key=key,
            attempts=len(rows),
            successes=count_by[Spend.SUCCEEDED],
            prompt_tokens=sum(r.prompt_tokens for r in rows),
            completion_tokens=sum(r.completion_tokens for r in rows),
            gpu_seconds=sum(r.gpu_seconds for r in rows),
            cost=sum(r.cost for r in rows),
            window_s=window_s,
            ok_prompt_tokens=sum(r.prompt_tokens for r in rows if r.spend is Spend.SUCCEEDED),
            ok_completion_tokens=sum(
                r.completion_tokens for r in rows if r.spend is Spend.SUCCEEDED
            ),
            end_to_end=Percentiles.of([r.end_to_end_s for r in rows if r.end_to_end_s is not None]),
            queue_wait=Percentiles.of([r.queue_wait_s for r in rows if _ran(r)]),
            engine=Percentiles.of([r.engine_s for r in rows if _ran(r)]),
            ttft=Percentiles.of([r.ttft_s for r in rows if r.ttft_s is not None]),
            client_ttft=Percentiles.of(
                [r.client_ttft_s for r in rows if r.client_ttft_s is not None]
            ),
            cost_by_spend=cost_by,
            count_by_spend=count_by,
        )


def _ran(row: AttemptRow) -> bool:
    return row.spend is not Spend.CANCELLED


def fetch_attempts(session: Session, window: Window) -> list[AttemptRow]:
    """Every attempt in the window, joined with its request and tenant, in time order."""
    rows = session.execute(
        select(
            LedgerEntry.model,
            LedgerEntry.task,
            LedgerEntry.tenant_id,
            Tenant.name,
            LedgerEntry.outcome,
            LedgerEntry.cost,
            LedgerEntry.gpu_seconds,
            LedgerEntry.prompt_tokens,
            LedgerEntry.completion_tokens,
            LedgerEntry.queue_wait_s,
            LedgerEntry.engine_s,
            LedgerEntry.ttft_s,
            LedgerEntry.client_ttft_s,
            LedgerEntry.created_at,
            Request.status,
            Request.created_at.label("request_created_at"),
            Request.finished_at,
        )
        .join(Request, Request.id == LedgerEntry.request_id)
        .outerjoin(Tenant, Tenant.id == LedgerEntry.tenant_id)
        .where(LedgerEntry.created_at >= window.since, LedgerEntry.created_at < window.until)
        .order_by(LedgerEntry.created_at)
    )
    return [_attempt_row(r) for r in rows]


def _attempt_row(r: Row[*tuple[Any, ...]]) -> AttemptRow:
    spend = spend_class(r.outcome, r.status)
    e2e = None
    if spend is Spend.SUCCEEDED and r.finished_at is not None:
        e2e = (as_utc(r.finished_at) - as_utc(r.request_created_at)).total_seconds()
    return AttemptRow(
        model=r.model,
        task=str(r.task),
        tenant=r.name or str(r.tenant_id),
        spend=spend,
        cost=r.cost,
        gpu_seconds=r.gpu_seconds,
        prompt_tokens=r.prompt_tokens,
        completion_tokens=r.completion_tokens,
        queue_wait_s=r.queue_wait_s,
        engine_s=r.engine_s,
        ttft_s=r.ttft_s,
        client_ttft_s=r.client_ttft_s,
        at=as_utc(r.created_at),
        end_to_end_s=e2e,
    )


def spend_class(outcome: Outcome, request_status: RequestStatus) -> Spend:
    """The one class an attempt's cost falls in (see the module docstring)."""
    if outcome is Outcome.FAILED and request_status is RequestStatus.SUCCEEDED:
        return Spend.RETRIED
    return Spend(outcome.value)


def summarise(
    rows: Iterable[AttemptRow], window: Window, by: GroupBy
) -> tuple[list[GroupStats], GroupStats]:
    """Per-group figures, sorted by key, and the figures for all groups together."""
    rows = list(rows)
    per_group = [_Acc(part).freeze(k, window.seconds) for k, part in split(rows, by).items()]
    return per_group, _Acc(rows).freeze("all", window.seconds)


def split(rows: Iterable[AttemptRow], by: GroupBy) -> dict[str, list[AttemptRow]]:
    """The rows of each group, keys sorted, each group's rows in their given order."""
    key = _KEYS[by]
    groups: dict[str, list[AttemptRow]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return {k: groups[k] for k in sorted(groups)}


def over_time(rows: Iterable[AttemptRow], window: Window, *, buckets: int) -> list[GroupStats]:
    """All groups together in ``buckets`` equal slices of the window; keys are ISO start times."""
    width = window.seconds / buckets
    accs = [_Acc() for _ in range(buckets)]
    for row in rows:
        index = int((row.at - window.since).total_seconds() // width) if width else 0
        accs[min(max(index, 0), buckets - 1)].rows.append(row)
    return [
        acc.freeze((window.since + timedelta(seconds=i * width)).isoformat(), width)
        for i, acc in enumerate(accs)
    ]


_KEYS: dict[GroupBy, Callable[[AttemptRow], str]] = {
    GroupBy.MODEL: lambda r: r.model,
    GroupBy.TASK: lambda r: r.task,
    GroupBy.TENANT: lambda r: r.tenant,
}
