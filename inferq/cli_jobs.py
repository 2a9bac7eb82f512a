"""`inferq submit`, `inferq jobs`, `inferq results`: bulk jobs from the command line, over HTTP."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from core.settings import Settings
from inferq.client import ApiError, Client

TERMINAL = ("completed", "cancelled", "expired", "failed")


def _client(settings: Settings) -> Client:
    try:
        return Client(settings.api_url, settings.api_key)
    except ApiError as exc:
        raise click.ClickException(str(exc)) from exc


def _read_json_file(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise click.BadParameter(
            f"{path}: not a readable JSON file: {exc}", param_hint=what
        ) from exc


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--task",
    required=True,
    type=click.Choice(["extract", "classify", "expand", "chat", "complete"]),
)
@click.option(
    "--schema",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON Schema (extract).",
)
@click.option("--labels", help="Comma-separated labels (classify).")
@click.option("--model", help="A configured model; the router chooses when omitted.")
@click.option("--max-tokens", type=int)
@click.option("--strict", is_flag=True, help="Refuse the whole file if any line is bad.")
@click.option("--webhook-url", help="POST job.completed here when the job is done.")
@click.option(
    "--wait/--no-wait", default=False, help="Show progress until done, then write results."
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Results file (with --wait).",
)
@click.pass_obj
def submit(
    settings: Settings,
    file: Path,
    task: str,
    schema: Path | None,
    labels: str | None,
    model: str | None,
    max_tokens: int | None,
    strict: bool,
    webhook_url: str | None,
    wait: bool,
    output: Path | None,
) -> None:
    """Submit FILE (JSONL, one item a line) as a bulk job."""
    shared: dict[str, Any] = {}
    if schema is not None:
        shared["schema"] = _read_json_file(schema, "--schema")
    if labels:
        shared["labels"] = [label.strip() for label in labels.split(",") if label.strip()]
    spec: dict[str, Any] = {"task": task, "input": shared, "strict": strict}
    spec.update({k: v for k, v in {"model": model, "webhook_url": webhook_url}.items() if v})
    if max_tokens:
        spec["params"] = {"max_tokens": max_tokens}
    console = Console(stderr=True)
    with _client(settings) as client:
        try:
            job = client.submit_job(file, spec)
            console.print(
                f"job {job['id']}: {job['total']} items accepted, {job['invalid']} bad lines"
            )
            if job["invalid"]:
                console.print(f"  see them with: inferq results {job['id']} --errors")
            if not wait:
                click.echo(job["id"])
                return
            job = _follow(client, job, console)
            target = output or file.with_suffix(".results.jsonl")
            _write(client, job["id"], "results", target)
        except ApiError as exc:
            raise click.ClickException(str(exc)) from exc
    console.print(f"{job['status']}: {_counts(job)}; results in {target}")
    click.echo(job["id"])


def _follow(client: Client, job: dict[str, Any], console: Console) -> dict[str, Any]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(job["task"], total=job["total"])
        while True:
            job = client.job(job["id"])
            done = sum(
                n for status, n in job["counts"].items() if status not in ("queued", "running")
            )
            progress.update(bar, completed=done)
            if job["status"] in TERMINAL:
                return job
            time.sleep(0.5)


def _counts(job: dict[str, Any]) -> str:
    return ", ".join(f"{n} {status}" for status, n in job["counts"].items() if n)


def _write(client: Client, job_id: str, what: str, target: Path) -> None:
    with target.open("wb") as handle:
        for chunk in client.download(job_id, what):
            handle.write(chunk)


@click.command()
@click.option("--limit", default=20, show_default=True)
@click.pass_obj
def jobs(settings: Settings, limit: int) -> None:
    """List your recent jobs, one a line (tab-separated)."""
    with _client(settings) as client:
        try:
            found = client.jobs(limit)
        except ApiError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo("id\ttask\tstatus\tdone/total\tcreated")
    for job in found:
        done = sum(n for s, n in job["counts"].items() if s not in ("queued", "running"))
        created = job["created_at"][:19]
        click.echo(f"{job['id']}\t{job['task']}\t{job['status']}\t{done}/{job['total']}\t{created}")


@click.command()
@click.argument("job_id")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Default: stdout."
)
@click.option("--errors", "what", flag_value="errors", help="The bad input lines instead.")
@click.option("--results", "what", flag_value="results", default=True, hidden=True)
@click.pass_obj
def results(settings: Settings, job_id: str, output: Path | None, what: str) -> None:
    """Download a job's results (JSONL in input order, keyed by item id) or its errors."""
    with _client(settings) as client:
        try:
            if output is None:
                for chunk in client.download(job_id, what):
                    click.echo(chunk, nl=False)
            else:
                _write(client, job_id, what, output)
        except ApiError as exc:
            raise click.ClickException(str(exc)) from exc
