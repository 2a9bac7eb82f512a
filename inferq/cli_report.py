"""`inferq report`: the ledger's four numbers as tables (or JSON), and a plot over time.

The arithmetic and its definitions live in :mod:`storage.ledger_stats`; this module only
reads the options, prints and draws.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from core.settings import Settings
from storage.ledger_stats import (
    WASTE,
    GroupBy,
    GroupStats,
    Spend,
    Window,
    fetch_attempts,
    over_time,
    summarise,
)

pass_settings = click.make_pass_decorator(Settings)

_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Latency stages: the GroupStats attribute and its label in the table. ``client_ttft`` is the
# time to first token a client sees (queue included), beside the engine's own ``ttft``.
_STAGES = {
    "end_to_end": "end_to_end",
    "queue_wait": "queue_wait",
    "engine": "engine",
    "ttft": "ttft",
    "client_ttft": "ttft (client)",
}


def parse_when(text: str, now: datetime) -> datetime:
    """An ISO time (UTC unless it says otherwise) or a duration ago: ``90s``, ``30m``, ``2d``."""
    ago = _AGO.match(text.strip())
    if ago:
        return now - timedelta(seconds=float(ago[1]) * _UNIT_S[ago[2]])
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise click.BadParameter(f"{text!r}: not an ISO time nor a duration like 30m") from exc
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@click.command()
@click.option("--since", default="24h", show_default=True, help="ISO time, or a duration ago.")
@click.option("--until", default=None, help="ISO time, or a duration ago. [default: now]")
@click.option(
    "--by",
    type=click.Choice([g.value for g in GroupBy]),
    default=GroupBy.MODEL.value,
    show_default=True,
)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--buckets", type=click.IntRange(1, 1000), default=30, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of tables.")
@pass_settings
def report(
    settings: Settings,
    since: str,
    until: str | None,
    by: str,
    plot: Path | None,
    buckets: int,
    as_json: bool,
) -> None:
    """Latency by stage, throughput at P95, cost per success and waste, from the ledger."""
    from storage.db import make_engine, make_sessionmaker

    now = datetime.now(UTC)
    window = Window(parse_when(since, now), parse_when(until, now) if until else now)
    if window.seconds <= 0:
        raise click.BadParameter("--since must be before --until")
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            rows = fetch_attempts(session, window)
    finally:
        engine.dispose()
    groups, total = summarise(rows, window, GroupBy(by))
    if as_json:
        click.echo(json.dumps(report_json(window, by, groups, total), indent=2))
    else:
        click.echo(render_tables(window, by, groups, total))
    if plot is not None:
        plot_over_time(over_time(rows, window, buckets=buckets), plot)
        click.echo(f"plot written to {plot}", err=as_json)


def stats_json(stats: GroupStats) -> dict[str, Any]:
    data = asdict(stats)
    data.update(
        throughput=stats.throughput,
        cost_per_success=stats.cost_per_success,
        waste_share=stats.waste_share,
        share_by_spend={s.value: stats.share(s) for s in Spend},
    )
    return data


def report_json(
    window: Window, by: str, groups: list[GroupStats], total: GroupStats
) -> dict[str, Any]:
    return {
        "since": window.since.isoformat(),
        "until": window.until.isoformat(),
        "window_s": window.seconds,
        "by": by,
        "groups": [stats_json(g) for g in groups],
        "total": stats_json(total),
    }


def render_tables(window: Window, by: str, groups: list[GroupStats], total: GroupStats) -> str:
    """Three plain-text tables; the last row of each is all groups together."""
    rows = [*groups, total]
    head = f"ledger {window.since.isoformat()} .. {window.until.isoformat()} "
    head += f"({window.seconds:.0f} s), by {by}; {total.attempts} attempts"
    return "\n\n".join(
        [
            head,
            "Latency (nearest-rank percentiles)\n" + _table(_latency_rows(by, rows), left=2),
            "Throughput at P95 latency and cost per successful inference\n"
            + _table(_cost_rows(by, rows)),
            f"Spend by outcome (share of cost; attempts); waste = {' + '.join(WASTE)}\n"
            + _table(_waste_rows(by, rows)),
        ]
    )


def _latency_rows(by: str, groups: list[GroupStats]) -> list[list[str]]:
    table = [[by, "stage", "n", "p50 s", "p95 s", "p99 s"]]
    for g in groups:
        for stage, label in _STAGES.items():
            p = getattr(g, stage)
            table.append(
                [g.key, label, str(p.count), f"{p.p50:.3f}", f"{p.p95:.3f}", f"{p.p99:.3f}"]
            )
    return table


def _cost_rows(by: str, groups: list[GroupStats]) -> list[list[str]]:
    table = [[by, "ok", "attempts", "prompt tok", "compl tok", "ok/s", "@p95 e2e s"]]
    table[0] += ["gpu-s", "cost", "cost/ok"]
    for g in groups:
        per_ok = "-" if g.cost_per_success is None else f"{g.cost_per_success:.6f}"
        table.append(
            [
                g.key,
                str(g.successes),
                str(g.attempts),
                str(g.prompt_tokens),
                str(g.completion_tokens),
                f"{g.throughput:.3f}",
                f"{g.end_to_end.p95:.3f}",
                f"{g.gpu_seconds:.3f}",
                f"{g.cost:.6f}",
                per_ok,
            ]
        )
    return table


def _waste_rows(by: str, groups: list[GroupStats]) -> list[list[str]]:
    table = [[by, *(s.value for s in Spend), "waste"]]
    for g in groups:
        shares = [f"{_pct(g.share(s))} ({g.count_by_spend[s]})" for s in Spend]
        table.append([g.key, *shares, _pct(g.waste_share)])
    return table


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def _table(rows: list[list[str]], *, left: int = 1) -> str:
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


def plot_over_time(series: list[GroupStats], path: Path) -> None:
    """Latency percentiles and cost per success over time, drawn with Agg into a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    times = [datetime.fromisoformat(s.key) for s in series]
    figure = Figure(figsize=(10, 7), layout="constrained")
    FigureCanvasAgg(figure)
    latency, cost = figure.subplots(2, 1, sharex=True)
    for name in ("p50", "p95", "p99"):
        values = [getattr(s.end_to_end, name) if s.end_to_end.count else math.nan for s in series]
        latency.plot(times, values, marker="o", label=f"end to end {name}")
    for stage in ("queue_wait", "engine"):
        values = [getattr(s, stage).p95 if getattr(s, stage).count else math.nan for s in series]
        latency.plot(times, values, linestyle="--", label=f"{stage} p95")
    latency.set_ylabel("seconds")
    latency.set_title("Latency percentiles")
    latency.legend(loc="upper left")
    per_ok = [math.nan if s.cost_per_success is None else s.cost_per_success for s in series]
    cost.plot(times, per_ok, marker="o", color="tab:red")
    cost.set_ylabel("cost per successful inference")
    cost.set_title("Cost per successful inference (all attempts' cost / successes)")
    cost.set_xlabel("time (UTC)")
    figure.savefig(path, format="png", dpi=100)
