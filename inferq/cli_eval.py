"""`inferq eval`: run evaluations, compare them, mark a baseline, import gold, schedule.

Commands talk to Postgres and the broker directly (service mode), as a worker does; the
work itself lives in :mod:`quality.runs` and :mod:`quality.compare`.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import click
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.enums import TaskKind
from core.settings import Settings
from inferq.cli_db import database

pass_settings = click.make_pass_decorator(Settings)
SCORED = ("extract", "classify", "expand")


@contextmanager
def _sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    from storage.db import make_sessionmaker

    engine = database(settings)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


@click.group("eval")
def eval_group() -> None:
    """Evaluate models on the sampled pool and flag quality regressions."""


@eval_group.command("run")
@click.option("--candidate", required=True, help="The configured model to evaluate.")
@click.option(
    "--reference",
    default=None,
    help="pool (production's answers), gold (imported labels) or a configured model. "
    "[default: INFERQ_EVAL_REFERENCE, pool]",
)
@click.option("--task", type=click.Choice(SCORED), default="extract", show_default=True)
@click.option("--baseline", is_flag=True, help="Mark this run as its task kind's baseline.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None, help="Regression drop.")
@click.option("--timeout", type=click.FloatRange(min=1), default=None, help="Seconds to wait.")
@pass_settings
def run(
    settings: Settings,
    candidate: str,
    reference: str | None,
    task: str,
    baseline: bool,
    threshold: float | None,
    timeout: float | None,
) -> None:
    """Replay the pool on CANDIDATE at batch priority, score it and store the run."""
    from quality.runs import run_eval
    from quality.spec import EvalError, EvalSpec
    from router import ConfigError
    from submission.services import build_services

    if settings.embedded:
        raise click.UsageError("eval run needs INFERQ_BROKER_URL and INFERQ_DATABASE_URL")
    spec = EvalSpec(
        candidate=candidate,
        reference=reference or settings.eval_reference,
        task=TaskKind(task),
        baseline=baseline,
    )
    try:
        services = build_services(settings)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        outcome = run_eval(
            services,
            spec,
            threshold=settings.eval_threshold if threshold is None else threshold,
            timeout_s=timeout,
            echo=click.echo,
        )
    except EvalError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        services.dispose()
    result = outcome.run
    click.echo(f"run {result.id} {result.status.value} in {outcome.seconds:.1f}s")
    if outcome.comparison is None:
        raise click.ClickException(f"evaluation failed: {result.error}")
    click.echo(_details(result.scores or {}))
    for line in outcome.comparison.lines():
        click.echo(line)


def _details(scores: dict[str, object]) -> str:
    skip = {"metric", "value", "confusion", "field_exact"}
    parts = [f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()]
    shown = [p for p, k in zip(parts, scores, strict=True) if k not in skip]
    return "  " + "; ".join(shown)


@eval_group.command("report")
@click.option("--task", type=click.Choice(SCORED), default=None, help="[default: every kind]")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None, help="Regression drop.")
@pass_settings
def report(settings: Settings, task: str | None, threshold: float | None) -> None:
    """Latest run per task kind against the previous one and the baseline.

    Exits 1 when a REGRESSION is flagged, so CI can gate on it.
    """
    from quality.compare import latest_comparisons

    limit = settings.eval_threshold if threshold is None else threshold
    with _sessions(settings) as sessions, sessions() as session:
        comparisons = latest_comparisons(
            session, threshold=limit, task=TaskKind(task) if task else None
        )
    if not comparisons:
        raise click.ClickException(f"no succeeded evaluation runs{f' of {task}' if task else ''}")
    for comparison in comparisons:
        for line in comparison.lines():
            click.echo(line)
    if any(c.regression for c in comparisons):
        sys.exit(1)


@eval_group.command("baseline")
@click.argument("run_id")
@pass_settings
def baseline(settings: Settings, run_id: str) -> None:
    """Make RUN_ID its task kind's baseline (later runs are compared with it)."""
    from quality.run_store import mark_baseline
    from quality.spec import EvalError
    from storage.eval_tables import EvalRun

    try:
        wanted = uuid.UUID(run_id)
    except ValueError as exc:
        raise click.BadParameter(f"{run_id!r} is not a run id", param_hint="RUN_ID") from exc
    with _sessions(settings) as sessions, sessions.begin() as session:
        found = session.get(EvalRun, wanted)
        if found is None:
            raise click.ClickException(f"no evaluation run {run_id}")
        try:
            mark_baseline(session, found)
        except EvalError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"run {found.id} is the {found.task.value} baseline")


@eval_group.command("runs")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@pass_settings
def runs(settings: Settings, limit: int) -> None:
    """List recent runs, newest first."""
    from storage.eval_tables import EvalRun

    with _sessions(settings) as sessions, sessions() as session:
        rows = session.scalars(select(EvalRun).order_by(EvalRun.created_at.desc()).limit(limit))
        for r in rows:
            value = (r.scores or {}).get("value")
            shown = f"{value:.3f}" if isinstance(value, float) else "-"
            click.echo(
                f"{r.id} {r.created_at:%Y-%m-%d %H:%M} {r.task.value} {r.candidate} vs "
                f"{r.reference} {r.status.value} {shown} n={r.n}"
                f"{' baseline' if r.baseline else ''}{f' ({r.error})' if r.error else ''}"
            )


@eval_group.command("pool")
@click.option("--task", type=click.Choice(SCORED), required=True)
@click.option("-o", "--output", type=click.File("w"), default="-", show_default=True)
@pass_settings
def pool(settings: Settings, task: str, output: TextIO) -> None:
    """Write the pool of a task kind as JSON lines {"pool_id", "input", "output", "gold"}.

    The file to label for ``import-gold``: set ``output`` right and keep ``pool_id``.
    """
    from storage.eval_tables import EvalPoolItem

    with _sessions(settings) as sessions, sessions() as session:
        query = select(EvalPoolItem).where(EvalPoolItem.task == TaskKind(task))
        for item in session.scalars(query.order_by(EvalPoolItem.slot)):
            line = {"pool_id": item.id, "input": item.input, "output": item.output}
            output.write(json.dumps({**line, "gold": item.gold}, ensure_ascii=False) + "\n")


@eval_group.command("import-gold")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@pass_settings
def import_gold(settings: Settings, file: Path) -> None:
    """Set gold labels from FILE: JSON lines {"pool_id": N, "output": ...}, all or nothing."""
    from quality.gold import GoldError
    from quality.gold import import_gold as store_gold

    try:
        with _sessions(settings) as sessions, sessions.begin() as session:
            count = store_gold(session, file.read_bytes())
    except GoldError as exc:
        raise click.ClickException(f"{file}: {exc}") from exc
    click.echo(f"{count} gold labels imported")


@eval_group.command("beat")
@click.option("--loglevel", default="INFO", show_default=True)
@pass_settings
def beat(settings: Settings, loglevel: str) -> None:
    """Send the scheduled evaluation on INFERQ_EVAL_CRON (workers run it)."""
    from router import ConfigError, load_config
    from tasks.app import create_celery
    from tasks.eval_schedule import beat_schedule

    if settings.embedded:
        raise click.UsageError("the scheduler needs INFERQ_BROKER_URL (e.g. redis://...)")
    try:
        schedule = beat_schedule(settings)
        app = create_celery(settings, load_config(settings.config))
    except (ValueError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from exc
    app.conf.beat_schedule = schedule
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    app.Beat(loglevel=loglevel, schedule=str(settings.cache_dir / "eval-beat-schedule")).run()
