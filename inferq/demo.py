"""The main job on the embedded default: bulk attribute extraction over sample products."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TimeElapsedColumn,
)
from rich.table import Table

from api.schemas import CreateRequest
from api.service import Services, prepare, submit_job
from inferq.enums import Priority, TaskKind
from inferq.settings import Settings
from storage.migrate import upgrade
from storage.models import Job, Tenant
from storage.reports import Summary, job_summary, status_counts
from storage.tenants import create_tenant
from workers.embedded import embedded_workers

DATA = Path(__file__).parent / "data"
PRODUCTS = DATA / "products.jsonl"
SCHEMA = DATA / "product_schema.json"


@dataclass(frozen=True, slots=True)
class DemoResult:
    job_id: str
    summary: Summary


def run_demo(
    settings: Settings,
    *,
    products: Path = PRODUCTS,
    schema: Path = SCHEMA,
    limit: int | None = None,
    timeout_s: float = 1800.0,
    console: Console | None = None,
) -> DemoResult:
    """Migrate, start in-process workers, submit the extraction job, show progress, summarise."""
    from api.app import build_services

    console = console or Console()
    upgrade(settings.database_url)
    services = build_services(settings)
    items = _read_items(products, limit)
    schema_doc = json.loads(schema.read_text())
    with embedded_workers(settings, services.config, services.celery, services.sessions):
        tenant_id = _demo_tenant(services)
        bodies = [
            CreateRequest(
                task=TaskKind.EXTRACT,
                input={"text": item["text"], "schema": schema_doc},
                priority=Priority.BATCH,
            )
            for item in items
        ]
        prepared = [prepare(services, tenant_id, body) for body in bodies]
        job = Job(id=uuid.uuid4(), tenant_id=tenant_id, task=TaskKind.EXTRACT, total=len(prepared))
        submit_job(services, prepared, job=job)
        _follow(services, job.id, len(prepared), timeout_s, console)
    with services.sessions() as session:
        summary = job_summary(session, job.id)
    services.dispose()
    console.print(_table(summary))
    return DemoResult(str(job.id), summary)


def _read_items(path: Path, limit: int | None) -> list[dict[str, Any]]:
    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return items[:limit] if limit else items


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
    with Progress(*columns, console=console) as progress:
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
