"""The `inferq` command. Settings are built once, in the group, and passed to subcommands."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from pathlib import Path

import click

from core.settings import Settings, load_settings
from inferq.cli_db import database
from router import ConfigError, load_config

pass_settings = click.make_pass_decorator(Settings)


@click.group()
@click.option("--log-level", default="INFO", show_default=True, help="Python log level.")
@click.pass_context
def main(ctx: click.Context, log_level: str) -> None:
    """inferq: queue-driven asynchronous inference on your own models."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        ctx.obj = load_settings()
    except ValueError as exc:
        raise click.UsageError(f"bad INFERQ_* setting: {exc}") from exc


def _config(settings: Settings):  # type: ignore[no-untyped-def]
    try:
        return load_config(settings.config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@pass_settings
def migrate(settings: Settings) -> None:
    """Create or upgrade the database schema."""
    from storage.migrate import upgrade

    upgrade(settings.database_url)
    click.echo(f"database at head: {settings.database_url}")


@main.group()
def tenant() -> None:
    """Manage tenants and their API keys."""


@tenant.command("create")
@click.argument("name")
@pass_settings
def tenant_create(settings: Settings, name: str) -> None:
    """Create tenant NAME and print its new API key on the last line."""
    from storage.db import make_sessionmaker
    from storage.tenants import create_tenant

    engine = database(settings)
    try:
        with make_sessionmaker(engine).begin() as session:
            created, key = create_tenant(session, name)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        engine.dispose()
    click.echo(f"tenant {created.name} ({created.id}); its API key, shown once:")
    click.echo(key)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--access-log/--no-access-log", default=False, show_default=True)
@pass_settings
def api(settings: Settings, host: str, port: int, access_log: bool) -> None:
    """Serve the HTTP API. Embedded (no broker set), in-process workers serve every model."""
    import uvicorn

    from api.app import create_app
    from submission.services import build_services

    _config(settings)
    database(settings).dispose()  # reachable and migrated, or say so before serving
    if not settings.embedded:
        uvicorn.run(create_app(settings), host=host, port=port, access_log=access_log)
        return
    from workers.embedded import embedded_workers

    services = build_services(settings)
    with embedded_workers(settings, services.config, services.celery, services.sessions):
        uvicorn.run(create_app(settings, services), host=host, port=port, access_log=access_log)


@main.command()
@click.option("--model", "model", required=True, help="The configured model to serve.")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--metrics-port", type=int, default=0, help="Serve Prometheus /metrics here.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True)
@pass_settings
def worker(
    settings: Settings, model: str, loglevel: str, metrics_port: int, metrics_host: str
) -> None:
    """Run a worker for one model: it consumes only that model's queue."""
    from quality import scheduled
    from storage.db import make_sessionmaker
    from submission.live_config import LiveConfig
    from tasks.app import create_celery
    from tasks.queues import FixedQueue
    from workers.consumer import serve
    from workers.drain import drain_grace_s
    from workers.metrics import WorkerMetrics
    from workers.probes import Probes
    from workers.runtime import WorkerRuntime

    config = _config(settings)
    if model not in config.models:
        raise click.BadParameter(f"unknown model {model!r}; configured: {', '.join(config.models)}")
    if settings.embedded:
        raise click.UsageError("a separate worker needs INFERQ_BROKER_URL (e.g. redis://...)")
    app = create_celery(settings, config)
    engine = database(settings)
    # Served before the engine loads: /readyz answers 503 until it has (workers.probes).
    probes = Probes()
    metrics = WorkerMetrics() if metrics_port else None
    if metrics is not None:
        metrics.serve(metrics_port, metrics_host, probes=probes)
    sessions = make_sessionmaker(engine)
    # Reloaded on a file change, a canary decision or SIGHUP (submission.live_config).
    live = LiveConfig(settings.config, sessions, poll_s=settings.config_poll_s)
    runtime = WorkerRuntime.create(
        settings, config, model, sessions, app, current_config=live.current
    )
    if metrics is not None:
        runtime.writer.add_commit_hook(metrics.observe)
    scheduled.register(app, settings)  # every worker consumes the maintenance queue
    # SIGTERM drains: no new messages, the engine finishes, the rest is handed back.
    grace = {model: drain_grace_s(settings, config.models[model])}
    option = serve(app, {model: runtime}, drain=grace)
    runtime.start()
    live.start()
    live.install_sighup_when_ready()
    probes.started(runtime.progressing)
    try:
        app.Worker(
            queues=[FixedQueue.MAINTENANCE.value],
            pool="threads",
            concurrency=4,
            # One node per process: several workers of one model on a host (one per GPU)
            # would otherwise share a name, and Flower and inspect would merge them.
            hostname=f"{model}.{os.getpid()}@{socket.gethostname()}",
            loglevel=loglevel,
            **option,
        ).start()
    finally:
        live.stop()
        runtime.stop()
        engine.dispose()


@main.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
@pass_settings
def flower(settings: Settings, flower_args: tuple[str, ...]) -> None:
    """Run Flower (its options follow, e.g. --port=5555) on inferq's Celery app, so it knows
    every model's queues, the broker's key prefix and transport options, not only the broker
    URL. Needs the broker and the models config, not the database."""
    from tasks.app import create_celery

    if settings.embedded:
        raise click.UsageError("Flower needs INFERQ_BROKER_URL (e.g. redis://...)")
    sys.exit(create_celery(settings, _config(settings)).start(["flower", *flower_args]))


@main.command()
@pass_settings
def reconcile(settings: Settings) -> None:
    """Re-publish lost requests and expire overdue ones, until stopped (the API runs one
    too unless INFERQ_RECONCILER=false; several share the work)."""
    from maintenance.reconciler import Reconciler
    from storage.db import make_sessionmaker
    from tasks.app import create_celery

    config = _config(settings)
    engine = database(settings)
    reconciler = Reconciler(
        settings, config, make_sessionmaker(engine), create_celery(settings, config)
    )
    reconciler.start()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        reconciler.stop()
        engine.dispose()


@main.command()
@click.option("--older-than", required=True, help="A duration (30d, 12h) or an ISO time.")
@pass_settings
def prune(settings: Settings, older_than: str) -> None:
    """Delete uploaded files and empty the payloads of finished requests older than that;
    request rows and the ledger (so `inferq report`) stay as they were."""
    from datetime import UTC, datetime

    from inferq.cli_report import parse_when
    from storage.db import make_sessionmaker
    from storage.retention import prune as prune_old

    cutoff = parse_when(older_than, datetime.now(UTC))
    engine = database(settings)
    try:
        done = prune_old(make_sessionmaker(engine), cutoff)
    finally:
        engine.dispose()
    click.echo(
        f"before {cutoff.isoformat()}: {done.files} files ({done.file_bytes} bytes) deleted, "
        f"{done.requests} request payloads emptied"
    )


@main.command()
@click.option("--limit", type=int, default=None, help="Only the first N sample products.")
@click.option("--file", "products", type=click.Path(exists=True, path_type=Path), default=None)
@pass_settings
def demo(settings: Settings, limit: int | None, products: Path | None) -> None:
    """Run the bulk extraction demo on the embedded default and print a summary."""
    from inferq.demo import PRODUCTS, run_demo

    result = run_demo(settings, products=products or PRODUCTS, limit=limit)
    if result.summary.succeeded == 0:
        sys.exit(1)


@main.command("build-model")
@pass_settings
def build_model(settings: Settings) -> None:
    """Build the tiny offline model into the cache folder (done on first use anyway)."""
    from weights.tiny import ensure_tiny_model

    click.echo(ensure_tiny_model(settings.model_cache))


@main.command("train-tiny")
@click.option("--steps", default=900, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the trained and degraded models [default: the model cache].",
)
@click.option(
    "--measure",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Then score trained, degraded and random models on N held-out products.",
)
@pass_settings
def train_tiny(settings: Settings, steps: int, out: Path | None, measure: int) -> None:
    """Train the tiny model to extract product attributes (a few minutes on CPU)."""
    from inferq.training.train import TrainConfig, train_and_measure
    from weights.tiny import ensure_tiny_model

    train_and_measure(
        out or settings.model_cache,
        TrainConfig(steps=steps),
        random_model=ensure_tiny_model(settings.model_cache) if measure else None,
        measure=measure,
        echo=click.echo,
    )


@main.command()
@click.option("--loglevel", default="INFO", show_default=True)
@pass_settings
def webhooks(settings: Settings, loglevel: str) -> None:
    """Deliver webhooks from their queue (needs INFERQ_BROKER_URL)."""
    from workers.webhook_worker import run_webhook_worker

    if settings.embedded:
        raise click.UsageError("the webhook worker needs INFERQ_BROKER_URL (e.g. redis://...)")
    _config(settings)
    run_webhook_worker(settings, loglevel=loglevel)


def _register_client_commands() -> None:
    from inferq.cli_canary import canary_group
    from inferq.cli_eval import eval_group
    from inferq.cli_jobs import jobs, results, submit
    from inferq.cli_report import report

    for command in (submit, jobs, results, report, eval_group, canary_group):
        main.add_command(command)
    from inferq.cli_keys import budget_command, key_group

    tenant.add_command(key_group)
    tenant.add_command(budget_command)


_register_client_commands()


if __name__ == "__main__":
    main()
