"""The main job on the embedded default: bulk attribute extraction over sample products.

The demo runs the trained tiny extractor that ships with the package (``inferq train-tiny``'s
default run, packed into ``inferq/data``; see :mod:`inferq.training.train`) wherever the config
names the random-weight ``builtin:tiny``. It submits the sample catalogue as one bulk job on the
same code path as service mode (SQLite, the in-process broker and worker), then prints a few
rows, field accuracy against the catalogue's labels and the job's summary.

Whatever the libraries underneath print (vLLM, torch, transformers: logs, warnings, C++ and
progress bars) goes to a log file the demo names; the terminal shows the demo's output alone.

The catalogue and the training data come from one generator (:mod:`inferq.training.products`,
other seeds), so the accuracy is in-distribution: it shows a trained model's answers arriving
intact through the queue, not how the model does on real product copy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TimeElapsedColumn,
)
from rich.table import Table

from core.enums import Priority, RequestStatus, TaskKind
from core.settings import Settings
from inferq.training.train import SHIPPED_PATH, ensure_shipped_model
from quality.scoring import ExtractScores, extract_scores, normalise_value
from router.config import BUILTIN_TINY
from storage.job_summary import Summary, job_summary, status_counts
from storage.jobs import results
from storage.tables import Job, Tenant
from storage.tenants import create_tenant
from submission.prepare import prepare
from submission.request import CreateRequest
from submission.services import Services, build_services
from submission.submit import submit_job
from workers.embedded import embedded_workers

DATA = Path(__file__).parent / "data"
PRODUCTS = DATA / "products.jsonl"
SCHEMA = DATA / "product_schema.json"
LOG_NAME = "demo.log"
SAMPLE_ROWS = 5
SNIPPET_CHARS = 60
IN_DISTRIBUTION = (
    "In-distribution: the sample products and the training data come from one generator "
    "(inferq/training/products.py: same templates, same closed lists of values), so this is "
    "no measure of real catalogue copy; see docs/quality.md."
)


@dataclass(frozen=True, slots=True)
class DemoResult:
    job_id: str
    summary: Summary
    # Against the products' ``attributes`` labels; None when the file carries none.
    scores: ExtractScores | None
    # The shipped trained model's folder, or None when the config names no builtin:tiny.
    model_path: Path | None
    log_path: Path


def run_demo(
    settings: Settings,
    *,
    products: Path = PRODUCTS,
    schema: Path = SCHEMA,
    limit: int | None = None,
    timeout_s: float = 1800.0,
    console: Console | None = None,
) -> DemoResult:
    """Migrate, start in-process workers, submit the extraction job, show progress and results.

    This process's stdout and stderr point at ``<cache dir>/demo.log`` meanwhile; the demo
    prints on a copy of the terminal (or on ``console``).
    """
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.cache_dir / LOG_NAME
    with output_to(log_path) as terminal:
        console = console or Console(file=terminal)
        console.print(
            f"Logs and warnings of vLLM, torch and transformers: {log_path}", soft_wrap=True
        )
        try:
            return _run(
                settings,
                products=products,
                schema=schema,
                limit=limit,
                timeout_s=timeout_s,
                console=console,
                log_path=log_path,
            )
        except BaseException:
            console.print(
                f"[red]The demo failed; what the libraries printed is in {log_path}",
                soft_wrap=True,
            )
            raise


@contextmanager
def output_to(path: Path) -> Iterator[TextIO]:
    """Point file descriptors 1 and 2 at ``path`` for the block; yield a stream on the old 1.

    Descriptors rather than ``sys.stdout``: C++ warnings (torch, oneDNN), progress bars and
    child processes write to them directly.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    terminal = os.fdopen(os.dup(saved[0]), "w", encoding=encoding, errors="replace")
    try:
        os.dup2(log, 1)
        os.dup2(log, 2)
        yield terminal
    finally:
        terminal.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log):
            os.close(fd)


def _run(
    settings: Settings,
    *,
    products: Path,
    schema: Path,
    limit: int | None,
    timeout_s: float,
    console: Console,
    log_path: Path,
) -> DemoResult:
    # Here, not at the top: alembic logs as it is imported, and that belongs in the log too.
    from storage.migrate import upgrade

    settings, model_path = _with_trained_model(settings)
    if model_path is not None:
        console.print(
            f"Model: the tiny Llama trained by `inferq train-tiny` "
            f"({SHIPPED_PATH.relative_to(DATA.parent.parent)}), unpacked to {model_path}",
            soft_wrap=True,
        )
    upgrade(settings.database_url)
    services = build_services(settings)
    items = _read_items(products, limit)
    schema_doc = json.loads(schema.read_text())
    with embedded_workers(settings, services.config, services.celery, services.sessions):
        tenant_id = _demo_tenant(services)
        prepared = [
            dataclasses.replace(
                prepare(services, tenant_id, _body(item, schema_doc)),
                item_id=_item_id(item, line),
                line=line,
            )
            for line, item in enumerate(items, start=1)
        ]
        job = Job(id=uuid.uuid4(), tenant_id=tenant_id, task=TaskKind.EXTRACT, total=len(prepared))
        submit_job(services, prepared, job=job)
        _follow(services, job.id, len(prepared), timeout_s, console)
    with services.sessions() as session:
        summary = job_summary(session, job.id)
        outputs = {
            row.item_id: row.output if row.status is RequestStatus.SUCCEEDED else None
            for row in results(session, job.id)
        }
    services.dispose()
    answers = [outputs.get(_item_id(item, line)) for line, item in enumerate(items, start=1)]
    scores = _score(items, answers, schema_doc)
    console.print(_samples(items, answers))
    if scores is None:
        console.print(f"{products.name} has no `attributes` labels: no accuracy to show.")
    else:
        console.print(_accuracy(scores, products.name))
        console.print(IN_DISTRIBUTION, soft_wrap=True)
    console.print(_table(summary))
    return DemoResult(str(job.id), summary, scores, model_path, log_path)


def _with_trained_model(settings: Settings) -> tuple[Settings, Path | None]:
    """``settings`` with a config that runs the shipped trained extractor wherever the
    configured one names ``builtin:tiny`` (random weights); that config goes to the cache."""
    doc = yaml.safe_load(settings.config.read_text())
    specs = [
        s for s in (doc.get("models") or {}).values() if s.get("path", BUILTIN_TINY) == BUILTIN_TINY
    ]
    if not specs:
        return settings, None
    trained = ensure_shipped_model(settings.model_cache)
    for spec in specs:
        spec["path"] = str(trained)
    path = settings.cache_dir / "demo-config.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return settings.model_copy(update={"config": path}), trained


def _read_items(path: Path, limit: int | None) -> list[dict[str, Any]]:
    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return items[:limit] if limit else items


def _item_id(item: dict[str, Any], line: int) -> str:
    return str(item.get("id", line))


def _body(item: dict[str, Any], schema: dict[str, Any]) -> CreateRequest:
    return CreateRequest(
        task=TaskKind.EXTRACT,
        input={"text": item["text"], "schema": schema},
        priority=Priority.BATCH,
    )


def _demo_tenant(services: Services) -> Any:
    from sqlalchemy import select

    with services.sessions.begin() as session:
        tenant = session.scalar(select(Tenant).where(Tenant.name == "demo"))
        if tenant is None:
            tenant, _key = create_tenant(session, "demo")
        return tenant.id


def _follow(
    services: Services, job_id: Any, total: int, timeout_s: float, console: Console
) -> None:
    columns = (
        *Progress.get_default_columns()[:2],
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    deadline = time.monotonic() + timeout_s
    # No redirection of sys.stdout/stderr onto the terminal: they lead to the log.
    with Progress(
        *columns, console=console, redirect_stdout=False, redirect_stderr=False
    ) as progress:
        bar = progress.add_task("extracting", total=total)
        while True:
            with services.sessions() as session:
                counts = status_counts(session, job_id)
            done = sum(n for status, n in counts.items() if status.terminal)
            progress.update(bar, completed=done)
            if done >= total:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id}: {done} of {total} done after {timeout_s:.0f}s")
            time.sleep(0.2)


def _score(
    items: list[dict[str, Any]], answers: list[Any], schema: dict[str, Any]
) -> ExtractScores | None:
    """Field accuracy of the labelled items (a failed request scores as no fields)."""
    labelled = [
        (item["attributes"], answer)
        for item, answer in zip(items, answers, strict=True)
        if isinstance(item.get("attributes"), dict)
    ]
    if not labelled:
        return None
    return extract_scores([a for _, a in labelled], [r for r, _ in labelled], schema=schema)


def _samples(items: list[dict[str, Any]], answers: list[Any]) -> Table:
    table = Table(title="sample rows: input → extracted (✗ differs from the label)")
    table.add_column("id")
    table.add_column("input (start)", ratio=1)
    table.add_column("extracted", ratio=1)
    for line, (item, answer) in enumerate(zip(items, answers, strict=True), start=1):
        if line > SAMPLE_ROWS:
            break
        text = item["text"]
        snippet = escape(text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 1] + "…")
        table.add_row(_item_id(item, line), snippet, _attributes(answer, item.get("attributes")))
    return table


def _attributes(answer: Any, label: Any) -> str:
    if not isinstance(answer, dict):
        return "[red](no answer)"
    parts = []
    for key, value in answer.items():
        part = escape(f"{key}: {value}")
        if isinstance(label, dict) and normalise_value(value) != normalise_value(label.get(key)):
            part += " [red]✗[/] " + escape(f"(label: {label.get(key)})")
        parts.append(part)
    return "\n".join(parts)


def _accuracy(s: ExtractScores, source: str) -> Table:
    table = Table(title=f"field accuracy vs {source} labels")
    table.add_column("field")
    table.add_column("right", justify="right")
    for field, share in s.field_exact.items():
        table.add_row(field, f"{round(share * s.n)}/{s.n} ({share:.1%})")
    mean = sum(s.per_item) / s.n if s.n else 0.0
    table.add_row("all fields of a product", f"{round(s.all_fields_exact * s.n)}/{s.n}")
    table.add_row("field accuracy (mean)", f"{mean:.3f}")
    table.add_row("schema-valid answers", f"{round(s.schema_valid * s.n)}/{s.n}")
    return table


def _table(s: Summary) -> Table:
    table = Table(title="inferq demo: attribute extraction")
    table.add_column("figure")
    table.add_column("value", justify="right")
    cost = f"${s.cost_per_success:.8f}" if s.cost_per_success is not None else "n/a"
    rows = [
        ("requests", str(s.total)),
        ("succeeded / failed", f"{s.succeeded} / {s.failed}"),
        ("tokens (prompt + completion)", f"{s.prompt_tokens} + {s.completion_tokens}"),
        ("requests/s", f"{s.requests_per_s:.1f}"),
        ("latency p50 / p95", f"{s.p50_latency_s:.2f}s / {s.p95_latency_s:.2f}s"),
        ("mean batch size", f"{s.mean_batch_size:.1f}"),
        ("cost per successful inference", cost),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table
