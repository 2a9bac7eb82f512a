"""`inferq report`: the ledger's four numbers as tables (or JSON), and a plot over time.

The arithmetic and its definitions live in :mod:`storage.ledger_stats` and
:mod:`storage.throughput`; :mod:`inferq.report_data` gathers the figures once, and
:mod:`inferq.report_text` and :mod:`inferq.report_plot` show them. This module reads the
options, the database and the models config.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from core.settings import Settings
from inferq.cli_db import database
from inferq.report_budget import BUDGETS
from inferq.report_data import Section, build_report, report_json
from inferq.report_text import render_tables
from router.config import ConfigError, load_config
from storage.ledger_stats import GroupBy, Window, fetch_attempts
from storage.throughput import DEFAULT_P95_TARGET_S

pass_settings = click.make_pass_decorator(Settings)

_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# More blocks of the report (e.g. spend against budget): each adds a table and a JSON key.
SECTIONS: tuple[Section, ...] = (BUDGETS,)


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
@click.option(
    "--buckets",
    type=click.IntRange(1, 1000),
    default=30,
    show_default=True,
    help="At most this many time buckets; their length is a round one that fits the data.",
)
@click.option(
    "--p95-target-s",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_P95_TARGET_S,
    show_default=True,
    help="Throughput at P95 is the best bucket rate whose p95 end to end stayed within this.",
)
@click.option(
    "--fit/--no-fit",
    default=True,
    show_default=True,
    help="Shrink the window to its first and last ledger row.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of tables.")
@pass_settings
def report(
    settings: Settings,
    since: str,
    until: str | None,
    by: str,
    plot: Path | None,
    buckets: int,
    p95_target_s: float,
    fit: bool,
    as_json: bool,
) -> None:
    """Latency by stage, throughput at P95, cost per success and waste, from the ledger."""
    from storage.db import make_sessionmaker

    now = datetime.now(UTC)
    window = Window(parse_when(since, now), parse_when(until, now) if until else now)
    if window.seconds <= 0:
        raise click.BadParameter("--since must be before --until")
    try:
        config = load_config(settings.config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    engine = database(settings)
    try:
        with make_sessionmaker(engine)() as session:
            rows = fetch_attempts(session, window)
            data = build_report(
                rows,
                window,
                GroupBy(by),
                fit=fit,
                max_buckets=buckets,
                p95_target_s=p95_target_s,
                currency=config.currency,
                compare_to=config.compare_to,
            )
            for section in SECTIONS:
                value = section.collect(session, data)
                if value is not None:
                    data.sections[section.key] = value
    finally:
        engine.dispose()
    if as_json:
        click.echo(json.dumps(report_json(data), indent=2))
    else:
        extra = [s.render(data.sections[s.key], data) for s in SECTIONS if s.key in data.sections]
        click.echo(render_tables(data, extra))
    if plot is not None:
        from inferq.report_plot import write_plot

        write_plot(data, plot)
        click.echo(f"plot written to {plot}", err=as_json)
