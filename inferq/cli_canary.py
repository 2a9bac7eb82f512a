"""`inferq canary`: compare a canary route's two arms, replay evaluations through both, decide.

Routes are named by their ``name`` in the config, or ``<task>-<index>`` (``any-0`` for task
``*``). A decision is recorded in Postgres; the API and workers apply it within
``INFERQ_CONFIG_POLL_S`` seconds, without a restart. The work lives in :mod:`quality.canary`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click

from core.enums import TaskKind
from core.settings import Settings
from inferq.cli_db import database
from router import Verdict

if TYPE_CHECKING:
    from quality.canary import Status
    from quality.compare import RunSummary
    from storage.canary import ArmStats
    from submission.services import Services

pass_settings = click.make_pass_decorator(Settings)
SCORED = ("extract", "classify", "expand")
_task = click.option(
    "--task",
    type=click.Choice(SCORED),
    default=None,
    help="Task kind judged [default: the route's; extract for task *].",
)
_reference = click.option(
    "--reference",
    default=None,
    help="pool, gold or a configured model. [default: INFERQ_EVAL_REFERENCE, pool]",
)


@contextmanager
def _services(settings: Settings) -> Iterator[Services]:
    from quality.canary import CanaryError
    from quality.spec import EvalError
    from router import ConfigError
    from submission.services import build_services

    database(settings).dispose()  # reachable and migrated, or say so
    try:
        services = build_services(settings)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        yield services
    except (CanaryError, EvalError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        services.dispose()


@click.group("canary")
def canary_group() -> None:
    """Canary routes: a candidate model on a share of a route's traffic."""


@canary_group.command("status")
@click.argument("route")
@click.option("--window", default="24h", show_default=True, help="A duration (30m, 2d).")
@_task
@_reference
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_settings
def status(
    settings: Settings,
    route: str,
    window: str,
    task: str | None,
    reference: str | None,
    as_json: bool,
) -> None:
    """Both arms of ROUTE side by side: quality, cost, latency, failures, fallbacks."""
    from inferq.cli_report import parse_when
    from quality.canary import canary_status

    now = datetime.now(UTC)
    span = now - parse_when(window, now)
    if span.total_seconds() <= 0:
        raise click.BadParameter(f"{window!r}: the window must be a positive duration")
    with _services(settings) as services:
        found = canary_status(
            services,
            route,
            window=span,
            task=TaskKind(task) if task else None,
            reference=reference,
        )
    if as_json:
        click.echo(json.dumps(found.as_json(), indent=2))
        return
    for line in _table(found):
        click.echo(line)


def _table(found: Status) -> Iterator[str]:
    c, q, arms = found.canary, found.quality, found.arms
    decision = "undecided" if found.decision is None else found.decision.verdict
    yield (
        f"route {c.name}: control {c.control}, candidate {c.candidate} "
        f"on {c.share:.0%} of its traffic ({decision})"
    )
    yield f"requests created since {found.since:%Y-%m-%d %H:%M:%S} UTC"
    rows: list[tuple[str, str, str]] = [("", "control", "candidate")]

    def row(label: str, show: Callable[[ArmStats], str]) -> None:
        rows.append((label, show(arms["control"]), show(arms["candidate"])))

    row("requests", lambda a: str(a.requests))
    row("served by", lambda a: ", ".join(f"{m} {n}" for m, n in sorted(a.models.items())) or "-")
    row("succeeded", lambda a: str(a.succeeded))
    row("failure rate", lambda a: f"{a.failure_rate:.1%} ({a.failed})")
    row("fallback rate", lambda a: f"{a.fallback_rate:.1%} ({a.fallbacks})")
    row("cost/success", lambda a: _money(a.cost_per_success))
    row("latency p50", lambda a: f"{a.latency_p50_s:.3f} s")
    row("latency p95", lambda a: f"{a.latency_p95_s:.3f} s")
    row("ttft p50", lambda a: f"{a.ttft_p50_s:.3f} s")
    row("ttft p95", lambda a: f"{a.ttft_p95_s:.3f} s")
    runs = (q.control, q.candidate)
    metric = next((r.metric for r in runs if r is not None), "quality")
    rows.append((f"{q.task.value} {metric}", _run(q.control), _run(q.candidate)))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    for label, left, right in rows:
        yield f"{label:<{width[0]}}  {left:>{width[1]}}  {right:>{width[2]}}"
    if q.control is None or q.candidate is None:
        yield f"quality: no evaluation against {q.reference!r} of both arms (inferq canary eval)"
    else:
        verdict = "REGRESSION" if q.regression else "not worse"
        yield (
            f"quality against {q.reference!r} on {q.shared_items} shared items: {verdict} "
            f"(threshold {q.threshold:.3f})"
        )


def _money(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g} USD"


def _run(summary: RunSummary | None) -> str:
    if summary is None:
        return "no run"
    return f"{summary.value:.3f} [{summary.ci_low:.3f}, {summary.ci_high:.3f}] n={summary.n}"


@canary_group.command("eval")
@click.argument("route")
@_task
@_reference
@click.option("--timeout", type=click.FloatRange(min=1), default=None, help="Seconds to wait.")
@pass_settings
def eval_arms(
    settings: Settings, route: str, task: str | None, reference: str | None, timeout: float | None
) -> None:
    """Replay the evaluation pool through both arms of ROUTE and score them alike."""
    from quality.canary import replay_arms

    with _services(settings) as services:
        control, candidate = replay_arms(
            services,
            route,
            task=TaskKind(task) if task else None,
            reference=reference,
            timeout_s=timeout,
            echo=click.echo,
        )
    click.echo(f"control   {control.describe()}")
    click.echo(f"candidate {candidate.describe()}")


@canary_group.command("promote")
@click.argument("route")
@_task
@_reference
@click.option("--reason", default=None, help="Recorded with the decision.")
@pass_settings
def promote(
    settings: Settings, route: str, task: str | None, reference: str | None, reason: str | None
) -> None:
    """Make ROUTE's candidate its model (needs evaluation results for the candidate)."""
    _decide(settings, route, Verdict.PROMOTE, task=task, reference=reference, reason=reason)


@canary_group.command("abort")
@click.argument("route")
@click.option("--reason", default=None, help="Recorded with the decision.")
@pass_settings
def abort(settings: Settings, route: str, reason: str | None) -> None:
    """Send all of ROUTE's traffic back to its model."""
    _decide(settings, route, Verdict.ABORT, task=None, reference=None, reason=reason)


def _decide(
    settings: Settings,
    route: str,
    verdict: Verdict,
    *,
    task: str | None,
    reference: str | None,
    reason: str | None,
) -> None:
    from quality.canary import decide

    with _services(settings) as services:
        row = decide(
            services,
            route,
            verdict,
            task=TaskKind(task) if task else None,
            reference=reference,
            reason=reason,
        )
    click.echo(
        f"{verdict.value}: route {row.route}, candidate {row.candidate} (control {row.control}); "
        f"the API and workers follow within {settings.config_poll_s:g}s"
    )
