"""What `inferq report` shows, gathered once: the text, the JSON and the plot all read this.

The figures come from :mod:`storage.ledger_stats` and :mod:`storage.throughput`; this module
only decides the window, the buckets and the hosted-model comparison, and gives the JSON
shape. The JSON is a contract: keys are added, never renamed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from router.config import CompareTo
from storage.ledger_stats import AttemptRow, GroupBy, GroupStats, Spend, Window, split, summarise
from storage.throughput import AtP95, bucket_seconds, buckets_over, fit_window, throughput_at_p95


@dataclass(frozen=True, slots=True)
class Compared:
    """The same successful work priced on the hosted model, beside what it actually cost."""

    name: str
    cost: float
    cost_per_success: float | None
    saved: float  # the hosted price less the actual cost of every attempt (waste included)


@dataclass(slots=True)
class ReportData:
    requested: Window
    window: Window  # ``requested`` fitted to the first and last ledger row, unless told not to
    by: GroupBy
    groups: list[GroupStats]
    total: GroupStats
    buckets: list[GroupStats]  # all groups together, ``bucket_s`` each from ``window.since``
    headline: AtP95  # all groups together
    at_p95: dict[str, AtP95]  # by group key
    currency: str
    compare_to: CompareTo | None
    # Filled by the report's extra sections (see :class:`Section`), by section key.
    sections: dict[str, Any] = field(default_factory=dict)

    @property
    def fitted(self) -> bool:
        return self.window != self.requested

    @property
    def bucket_s(self) -> float:
        return self.buckets[0].window_s

    def compared(self, stats: GroupStats) -> Compared | None:
        if self.compare_to is None:
            return None
        c = self.compare_to
        hosted = stats.priced_per_token(
            c.price_per_million_input_tokens, c.price_per_million_output_tokens
        )
        per_ok = hosted / stats.successes if stats.successes else None
        return Compared(c.name, hosted, per_ok, hosted - stats.cost)


@dataclass(frozen=True, slots=True)
class Section:
    """One more block of the report, e.g. spend against a tenant's budget.

    ``collect`` runs with the report's database session once the figures are in and returns a
    JSON-safe value (None leaves the section out); ``render`` turns that value into the text
    block. The JSON carries it as ``sections[key]``.
    """

    key: str
    collect: Callable[[Session, ReportData], Any]
    render: Callable[[Any, ReportData], str]


def build_report(
    rows: Sequence[AttemptRow],
    requested: Window,
    by: GroupBy,
    *,
    fit: bool = True,
    max_buckets: int = 30,
    p95_target_s: float,
    currency: str = "USD",
    compare_to: CompareTo | None = None,
) -> ReportData:
    """The report's figures over ``requested``, or over the part of it the rows span."""
    window = fit_window(rows, requested) if fit else requested
    groups, total = summarise(rows, window, by)
    bucket_s = bucket_seconds(window.seconds, max_buckets=max_buckets)
    buckets = buckets_over(rows, window, bucket_s=bucket_s)
    at_p95 = {
        key: throughput_at_p95(buckets_over(part, window, bucket_s=bucket_s), target_s=p95_target_s)
        for key, part in split(rows, by).items()
    }
    return ReportData(
        requested=requested,
        window=window,
        by=by,
        groups=groups,
        total=total,
        buckets=buckets,
        headline=throughput_at_p95(buckets, target_s=p95_target_s),
        at_p95=at_p95,
        currency=currency,
        compare_to=compare_to,
    )


def stats_json(data: ReportData, stats: GroupStats, at_p95: AtP95) -> dict[str, Any]:
    out = asdict(stats)
    compared = data.compared(stats)
    out.update(
        throughput=stats.throughput,
        cost_per_success=stats.cost_per_success,
        waste_share=stats.waste_share,
        share_by_spend={s.value: stats.share(s) for s in Spend},
        throughput_at_p95=asdict(at_p95),
        compare=None if compared is None else asdict(compared),
    )
    return out


def report_json(data: ReportData) -> dict[str, Any]:
    window = data.window
    return {
        "since": window.since.isoformat(),
        "until": window.until.isoformat(),
        "window_s": window.seconds,
        "requested_since": data.requested.since.isoformat(),
        "requested_until": data.requested.until.isoformat(),
        "window_fitted": data.fitted,
        "by": data.by.value,
        "currency": data.currency,
        "compare_to": None if data.compare_to is None else data.compare_to.model_dump(),
        "p95_target_s": data.headline.target_s,
        "bucket_s": data.bucket_s,
        "buckets": [
            {
                "start": b.key,
                "attempts": b.attempts,
                "successes": b.successes,
                "throughput": b.throughput,
                "end_to_end_p95": b.end_to_end.p95 if b.successes else None,
                "cost_per_success": b.cost_per_success,
            }
            for b in data.buckets
        ],
        "groups": [stats_json(data, g, data.at_p95[g.key]) for g in data.groups],
        "total": stats_json(data, data.total, data.headline),
        "sections": data.sections,
    }
