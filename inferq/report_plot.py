"""`inferq report --plot`: the report's buckets drawn over the span of the data, into a PNG.

Five panels share the time axis (limited to the buckets, so a ten-minute run is not a dot on
a day-long axis): throughput per bucket coloured by whether its p95 met the target, latency
percentiles by stage, time to first token, cost per success (and on the hosted model, when
``compare_to`` is set), and per group the cost per success beside the hosted price.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inferq.report_data import ReportData
from inferq.report_text import duration, headline, money
from storage.ledger_stats import GroupStats, Percentiles

if TYPE_CHECKING:
    from matplotlib.artist import Artist
    from matplotlib.axes import Axes
    from matplotlib.container import BarContainer
    from matplotlib.figure import Figure

_HELD, _MISSED = "tab:green", "tab:gray"
# Legends to the right of their panel, where they hide no line.
_BESIDE: dict[str, Any] = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": 8}
_STAGE_COLOURS = {"end_to_end": "tab:blue", "queue_wait": "tab:orange", "engine": "tab:purple"}


def write_plot(data: ReportData, path: Path) -> None:
    build_figure(data).savefig(path, format="png", dpi=100)


def build_figure(data: ReportData) -> Figure:
    """The report's figure, drawn with Agg (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not data.total.attempts:
        figure = Figure(figsize=(8, 2))
        FigureCanvasAgg(figure)
        window = f"{data.window.since:%Y-%m-%d %H:%M:%S} .. {data.window.until:%Y-%m-%d %H:%M:%S}"
        figure.text(0.5, 0.5, f"no ledger rows in {window} UTC", ha="center", va="center")
        return figure
    figure = Figure(figsize=(11, 14), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(5, 1, height_ratios=[1, 1.2, 1, 1, 1])
    throughput, latency, ttft, cost, groups = axes
    for ax in (latency, ttft, cost):
        ax.sharex(throughput)
    # Matplotlib's date numbers (days): bars start at a bucket's start, lines at its middle.
    starts = [_date_number(datetime.fromisoformat(b.key)) for b in data.buckets]
    width = data.bucket_s / 86_400
    mids = [s + width / 2 for s in starts]
    _throughput(throughput, data, starts, width)
    _latency(latency, data.buckets, mids)
    _ttft(ttft, data.buckets, mids)
    _cost(cost, data, mids)
    _groups(groups, data)
    _time_axis(throughput, (starts[0], starts[-1] + width))
    for ax in (throughput, latency, ttft):
        ax.tick_params(labelbottom=False)
    cost.set_xlabel("time (UTC)")
    title = f"inferq report by {data.by.value}"
    if data.fitted:
        title += ", window fitted to the data (first to last ledger row)"
    title += f"\nthroughput at P95: {headline(data.headline)}"
    figure.suptitle(title, fontsize=10)
    return figure


def _date_number(moment: datetime) -> float:
    import matplotlib.dates as mdates

    return float(mdates.date2num(moment))  # type: ignore[no-untyped-call]


def _time_axis(ax: Axes, span: tuple[float, float]) -> None:
    import matplotlib.dates as mdates

    locator = mdates.AutoDateLocator(tz=UTC, minticks=4, maxticks=10)  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    formatter = mdates.ConciseDateFormatter(locator, tz=UTC)  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_formatter(formatter)
    ax.set_xlim(*span)


def _throughput(ax: Axes, data: ReportData, starts: list[float], width: float) -> None:
    from matplotlib.patches import Patch

    target = data.headline.target_s
    held = [b.successes > 0 and b.end_to_end.p95 <= target for b in data.buckets]
    rates = [b.throughput for b in data.buckets]
    colours = [_HELD if h else _MISSED for h in held]
    ax.bar(starts, rates, width=width, align="edge", color=colours, edgecolor="white")
    handles: list[Artist] = [
        Patch(color=_HELD, label=f"p95 end to end <= {target:g} s"),
        Patch(color=_MISSED, label=f"p95 end to end over {target:g} s"),
    ]
    if data.headline.rate is not None:
        label = f"throughput at P95: {data.headline.rate:.3g} ok/s"
        handles.append(ax.axhline(data.headline.rate, color="black", linestyle=":", label=label))
    _from_zero(ax, rates)
    ax.set_ylabel("successes / s")
    ax.set_title(f"Throughput per {duration(data.bucket_s)} bucket", fontsize=10)
    ax.legend(handles=handles, **_BESIDE)


def _line(ax: Axes, mids: list[float], series: list[Percentiles], pct: str, **style: Any) -> None:
    values = [getattr(p, pct) if p.count else math.nan for p in series]
    ax.plot(mids, values, marker="o", markersize=3, **style)


def _from_zero(ax: Axes, values: list[float] | None = None) -> None:
    """Y from 0 to a little above the highest value, so a flat line is not on the frame."""
    if values is None:
        ys = [np.asarray(line.get_ydata(), dtype=float) for line in ax.lines]
        values = [float(y) for y in np.concatenate(ys) if math.isfinite(y)] if ys else []
    ax.set_ylim(bottom=0, top=max(max(values, default=0.0) * 1.15, 1e-9))


def _latency(ax: Axes, buckets: list[GroupStats], mids: list[float]) -> None:
    for stage, colour in _STAGE_COLOURS.items():
        series = [getattr(b, stage) for b in buckets]
        label = stage.replace("_", " ")
        _line(ax, mids, series, "p95", color=colour, label=f"{label} p95")
        _line(ax, mids, series, "p50", color=colour, linestyle="--", label=f"{label} p50")
    _line(ax, mids, [b.end_to_end for b in buckets], "p99", color="tab:blue", linestyle=":")
    ax.lines[-1].set_label("end to end p99")
    _from_zero(ax)
    ax.set_ylabel("seconds")
    ax.set_title("Latency by stage (queue wait, engine, end to end)", fontsize=10)
    ax.legend(**_BESIDE)


def _ttft(ax: Axes, buckets: list[GroupStats], mids: list[float]) -> None:
    for stage, label, colour in (("ttft", "engine", "tab:cyan"), ("client_ttft", "client", "k")):
        series = [getattr(b, stage) for b in buckets]
        _line(ax, mids, series, "p95", color=colour, label=f"{label} p95")
        _line(ax, mids, series, "p50", color=colour, linestyle="--", label=f"{label} p50")
    _from_zero(ax)
    ax.set_ylabel("seconds")
    ax.set_title("Time to first token (engine's own; client's, queue included)", fontsize=10)
    ax.legend(**_BESIDE)


def _cost(ax: Axes, data: ReportData, mids: list[float]) -> None:
    from matplotlib.ticker import FuncFormatter

    actual = [math.nan if b.cost_per_success is None else b.cost_per_success for b in data.buckets]
    ax.plot(mids, actual, marker="o", markersize=3, color="tab:red", label="actual (all attempts)")
    if data.compare_to is not None:
        hosted = [getattr(data.compared(b), "cost_per_success", None) for b in data.buckets]
        values = [math.nan if v is None else v for v in hosted]
        ax.plot(
            mids, values, marker="s", markersize=3, color="tab:olive", label=data.compare_to.name
        )
    _from_zero(ax)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: money(v, data.currency)))
    ax.set_title("Cost per successful inference", fontsize=10)
    ax.legend(**_BESIDE)


def _groups(ax: Axes, data: ReportData) -> None:
    from matplotlib.ticker import FuncFormatter

    keys = [g.key for g in data.groups]
    xs = range(len(keys))
    shift = 0.2 if data.compare_to is not None else 0.0
    actual = [g.cost_per_success or 0.0 for g in data.groups]

    def label(bars: BarContainer) -> None:
        ax.bar_label(bars, fmt=lambda v: money(v, data.currency), fontsize=8)

    label(ax.bar([x - shift for x in xs], actual, width=0.4, color="tab:red", label="actual"))
    if data.compare_to is not None:
        hosted = [getattr(data.compared(g), "cost_per_success", None) or 0.0 for g in data.groups]
        name = data.compare_to.name
        label(ax.bar([x + shift for x in xs], hosted, width=0.4, color="tab:olive", label=name))
        ax.margins(y=0.15)
        saved = data.compared(data.total)
        if saved is not None:
            verb = "saved" if saved.saved >= 0 else "overspent"
            amount = money(abs(saved.saved), data.currency)
            ax.set_title(
                f"Cost per success by {data.by.value}; {verb} {amount} against {saved.name}"
                " over the window",
                fontsize=10,
            )
    if data.compare_to is None:
        ax.set_title(f"Cost per success by {data.by.value}", fontsize=10)
    ax.set_xticks(list(xs), keys, fontsize=8)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: money(v, data.currency)))
    ax.legend(**_BESIDE)
