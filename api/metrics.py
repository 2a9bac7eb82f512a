"""``GET /metrics``: queue depth and the age of the oldest waiting request per model.

These are the numbers an autoscaler adds workers by. A scrape costs one grouped query on the
open requests and one pass over the broker's queues, and the snapshot is kept for ``ttl_s`` so
that several scrapers (or a fast one) cost the same. The registry belongs to the app, not to
the module, so every app (and every test) has its own.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.enums import OPEN_STATUSES, RequestStatus
from quality.compare import RegressionCollector
from storage.tables import Request as RequestRow
from storage.tables import as_utc
from submission.services import Services
from tasks.queues import queue_depths

CACHE_TTL_S = 2.0
EVAL_TTL_S = 30.0  # evaluation runs change weekly; the gauge need not be fresher

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    token: str = request.app.state.metrics_token
    if token and not _bearer_matches(request.headers.get("authorization", ""), token):
        return Response(
            "metrics need 'Authorization: Bearer <INFERQ_METRICS_TOKEN>'\n",
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _bearer_matches(header: str, token: str) -> bool:
    scheme, _, given = header.partition(" ")
    # compare_digest: no early exit on the first differing character of the token.
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), token)


def install_metrics(app: FastAPI, *, ttl_s: float = CACHE_TTL_S, token: str = "") -> None:
    """Give the app its registry and route; services are looked up when a scrape comes.

    Args:
        token: when set, scrapes must send it as a Bearer token (queue depths and model
            names are not for every caller that can reach the API's port).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(lambda: app.state.services, ttl_s=ttl_s))
    registry.register(RegressionCollector(lambda: app.state.services, ttl_s=EVAL_TTL_S))
    app.state.metrics_registry = registry
    app.state.metrics_token = token
    app.include_router(router)


@dataclass(frozen=True, slots=True)
class ModelQueue:
    messages: int  # on the broker; a message carries a bundle of requests
    queued: int
    running: int
    oldest_queued_age_s: float


class QueueCollector(Collector):
    def __init__(self, services: Callable[[], Services], *, ttl_s: float) -> None:
        self._services = services
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._taken = -float("inf")
        self._snapshot: dict[str, ModelQueue] = {}

    def snapshot(self) -> dict[str, ModelQueue]:
        with self._lock:
            if time.monotonic() - self._taken >= self._ttl_s:
                services = self._services()
                self._snapshot = take_snapshot(services, list(services.config.models))
                self._taken = time.monotonic()
            return self._snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self.snapshot()
        gauges = [
            ("inferq_queue_messages", "Messages waiting on the model's broker queue.", "messages"),
            ("inferq_queued_requests", "Requests committed and not yet claimed.", "queued"),
            ("inferq_running_requests", "Requests claimed by a worker.", "running"),
            (
                "inferq_oldest_queued_age_seconds",
                "Age of the oldest queued request (0 when none).",
                "oldest_queued_age_s",
            ),
        ]
        for name, doc, attr in gauges:
            family = GaugeMetricFamily(name, doc, labels=["model"])
            for model, q in sorted(snap.items()):
                family.add_metric([model], getattr(q, attr))
            yield family


def take_snapshot(services: Services, models: Iterable[str]) -> dict[str, ModelQueue]:
    models = list(models)
    now = datetime.now(UTC)
    with services.sessions() as session:
        open_requests = open_by_model(session)
    depths = queue_depths(services.celery, models)
    snapshot = {}
    for model in models:
        queued, running, oldest = open_requests.get(model, (0, 0, None))
        age = max((now - oldest).total_seconds(), 0.0) if oldest else 0.0
        snapshot[model] = ModelQueue(depths[model], queued, running, age)
    return snapshot


def open_by_model(session: Session) -> dict[str, tuple[int, int, datetime | None]]:
    """Model → (queued, running, oldest queued time), in one grouped query."""
    rows = session.execute(
        select(
            RequestRow.model,
            RequestRow.status,
            func.count(),
            func.min(func.coalesce(RequestRow.queued_at, RequestRow.created_at)),
        )
        .where(RequestRow.status.in_(OPEN_STATUSES))
        .group_by(RequestRow.model, RequestRow.status)
    )
    found: dict[str, tuple[int, int, datetime | None]] = {}
    for model, status, count, oldest in rows:
        queued, running, first = found.get(model, (0, 0, None))
        if status is RequestStatus.QUEUED:
            queued, first = count, as_utc(oldest)
        else:
            running = count
        found[model] = (queued, running, first)
    return found
