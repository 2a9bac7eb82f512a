"""`inferq report` as plain-text tables, with numbers a reader takes in at a glance.

Costs carry their currency and three significant digits (``$0.0000412``, not ``0.000000``);
rates too. Times are UTC.
"""

from __future__ import annotations

import math
from datetime import datetime

from inferq.report_data import ReportData
from storage.ledger_stats import WASTE, GroupStats, Spend
from storage.throughput import AtP95

_SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥"}
# Latency stages: the GroupStats attribute and its label in the table. ``client_ttft`` is the
# time to first token a client sees (queue included), beside the engine's own ``ttft``.
STAGES = {
    "end_to_end": "end_to_end",
    "queue_wait": "queue_wait",
    "engine": "engine",
    "ttft": "ttft",
    "client_ttft": "ttft (client)",
}


def sig(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, never in exponent form; whole from 10**digits."""
    if value == 0 or not math.isfinite(value):
        return "0" if value == 0 else str(value)
    decimals = max(digits - 1 - math.floor(math.log10(abs(value))), 0)
    return f"{value:,.{decimals}f}"


def money(value: float | None, currency: str) -> str:
    """A cost with its currency: ``$0.0000412``, ``$12.30``, ``0.00512 CHF``; ``-`` for none."""
    if value is None:
        return "-"
    text = f"{abs(value):,.2f}" if abs(value) >= 1 else sig(abs(value))
    sign = "-" if value < 0 else ""
    symbol = _SYMBOLS.get(currency)
    return f"{sign}{symbol}{text}" if symbol else f"{sign}{text} {currency}"


def duration(seconds: float) -> str:
    """A bucket length the way people say it: ``20 s``, ``5 min``, ``2 h``, ``1 d``."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"


def when(moment: datetime, *, day_of: datetime | None = None) -> str:
    """``2026-12-03 10:00:02``, or only ``10:00:02`` on the same day as ``day_of``."""
    if day_of is not None and moment.date() == day_of.date():
        return moment.strftime("%H:%M:%S")
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def headline(at: AtP95) -> str:
    """The throughput at P95 in one sentence."""
    if at.peak_rate == 0:
        return "no successful requests in the window"
    if at.rate is None:
        return (
            f"no {duration(at.bucket_s)} bucket kept p95 end to end within {at.target_s:g} s "
            f"(peak {sig(at.peak_rate)} ok/s at a higher p95)"
        )
    start = datetime.fromisoformat(at.start or "")
    return (
        f"{sig(at.rate)} ok/s with p95 end to end {sig(at.p95_s or 0)} s "
        f"<= {at.target_s:g} s (best {duration(at.bucket_s)} bucket, from {when(start)} UTC; "
        f"peak {sig(at.peak_rate)} ok/s)"
    )


def render_tables(data: ReportData, extra: list[str] | None = None) -> str:
    """The heading, then one block per table; ``extra`` blocks (report sections) go last."""
    window, total = data.window, data.total
    by = data.by.value
    head = [
        f"ledger {when(window.since)} .. {when(window.until, day_of=window.since)} UTC "
        f"({sig(window.seconds)} s), by {by}; {total.attempts} attempts",
    ]
    if data.fitted:
        req = data.requested
        head.append(
            f"window fitted to the data (first to last ledger row) inside the requested "
            f"{when(req.since)} .. {when(req.until)} ({sig(req.seconds)} s)"
        )
    head.append(f"throughput at P95: {headline(data.headline)}")
    if not total.attempts:
        return "\n\n".join(["\n".join(head), *(extra or [])])
    rows = [*data.groups, total]
    blocks = [
        "\n".join(head),
        "Latency (nearest-rank percentiles)\n" + table(_latency_rows(by, rows), left=2),
        f"Throughput per {duration(data.bucket_s)} bucket, next to its p95 end to end "
        f"(* within {data.headline.target_s:g} s)\n" + table(_bucket_rows(data), left=1),
        f"Throughput at P95 by {by}\n" + table(_at_p95_rows(data)),
        f"Cost per successful inference ({data.currency})\n" + table(_cost_rows(data)),
        f"Spend by outcome (share of cost; attempts); waste = {' + '.join(WASTE)}\n"
        + table(_waste_rows(by, rows)),
    ]
    return "\n\n".join([*blocks, *(extra or [])])


def _latency_rows(by: str, groups: list[GroupStats]) -> list[list[str]]:
    out = [[by, "stage", "n", "p50 s", "p95 s", "p99 s"]]
    for g in groups:
        for stage, label in STAGES.items():
            p = getattr(g, stage)
            out.append([g.key, label, str(p.count), f"{p.p50:.3f}", f"{p.p95:.3f}", f"{p.p99:.3f}"])
    return out


def _bucket_rows(data: ReportData) -> list[list[str]]:
    out = [["from (UTC)", "ok", "attempts", "ok/s", "p95 e2e s", ""]]
    target = data.headline.target_s
    for b in data.buckets:
        start = datetime.fromisoformat(b.key)
        p95 = f"{b.end_to_end.p95:.3f}" if b.successes else "-"
        held = "*" if b.successes and b.end_to_end.p95 <= target else ""
        day = when(start, day_of=data.window.since)
        out.append([day, str(b.successes), str(b.attempts), sig(b.throughput), p95, held])
    return out


def _at_p95_rows(data: ReportData) -> list[list[str]]:
    out = [[data.by.value, "ok", "ok/s @p95", "its p95 s", "peak ok/s", "mean ok/s"]]
    pairs = [(g, data.at_p95[g.key]) for g in data.groups] + [(data.total, data.headline)]
    for g, at in pairs:
        rate = "-" if at.rate is None else sig(at.rate)
        p95 = "-" if at.p95_s is None else f"{at.p95_s:.3f}"
        out.append([g.key, str(g.successes), rate, p95, sig(at.peak_rate), sig(g.throughput)])
    return out


def _cost_rows(data: ReportData) -> list[list[str]]:
    cur = data.currency
    out = [[data.by.value, "ok", "attempts", "prompt tok", "compl tok", "gpu-s", "cost", "cost/ok"]]
    if data.compare_to is not None:
        name = data.compare_to.name
        out[0] += [f"{name} /ok", f"{name} cost", "saved"]
    for g in [*data.groups, data.total]:
        row = [g.key, str(g.successes), str(g.attempts), str(g.prompt_tokens)]
        row += [str(g.completion_tokens), sig(g.gpu_seconds), money(g.cost, cur)]
        row.append(money(g.cost_per_success, cur))
        compared = data.compared(g)
        if compared is not None:
            row += [money(compared.cost_per_success, cur), money(compared.cost, cur)]
            row.append(money(compared.saved, cur))
        out.append(row)
    return out


def _waste_rows(by: str, groups: list[GroupStats]) -> list[list[str]]:
    out = [[by, *(s.value for s in Spend), "waste"]]
    for g in groups:
        shares = [f"{_pct(g.share(s))} ({g.count_by_spend[s]})" for s in Spend]
        out.append([g.key, *shares, _pct(g.waste_share)])
    return out


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def table(rows: list[list[str]], *, left: int = 1) -> str:
    """Columns padded to their widest cell: the first ``left`` flush left, numbers right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(w) if i < left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
