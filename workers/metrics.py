"""Prometheus metrics of a worker: a commit hook on the writer, and an HTTP endpoint.

The hook sees each batch once its results and ledger rows are committed, so the counters agree
with the ledger. Metrics live in a registry of their own, made per worker, never at import.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from core.enums import Outcome
from storage.ledger import Attempt
from workers.probes import Probes
from workers.probes import serve as serve_probes

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class WorkerMetrics:
    """Counters and histograms fed by :meth:`observe`, the writer's commit hook."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.attempts = Counter(
            "inferq_attempts", "Attempts by outcome.", ["model", "task", "outcome"], registry=r
        )
        self.latency = Histogram(
            "inferq_latency_seconds",
            "Per-attempt latency by stage: queue, engine, ttft (the engine's), client_ttft (from "
            "the request's commit); end_to_end for successes.",
            ["model", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "inferq_batch_size",
            "Requests per engine batch.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("inferq_tokens", "Tokens processed.", ["model", "kind"], registry=r)
        self.cost = Counter(
            "inferq_cost",
            "Cost of attempts, in the price's currency.",
            ["model", "outcome"],
            registry=r,
        )
        self.gpu_seconds = Counter(
            "inferq_gpu_seconds", "GPU-seconds attributed to attempts.", ["model"], registry=r
        )

    def observe(self, attempts: Sequence[Attempt], outcomes: Sequence[Outcome]) -> None:
        """Record one committed batch (the :class:`workers.writer.BatchWriter` hook)."""
        batches = {a.batch_id: (a.model, a.batch_size) for a in attempts}
        for model, size in batches.values():  # one observation per engine batch
            self.batch_size.labels(model).observe(size)
        for a, outcome in zip(attempts, outcomes, strict=True):
            self._observe_one(a, outcome)

    def _observe_one(self, a: Attempt, outcome: Outcome) -> None:
        self.attempts.labels(a.model, a.task.value, outcome.value).inc()
        self.cost.labels(a.model, outcome.value).inc(a.cost)
        self.gpu_seconds.labels(a.model).inc(a.gpu_seconds)
        self.tokens.labels(a.model, "prompt").inc(a.prompt_tokens)
        self.tokens.labels(a.model, "completion").inc(a.completion_tokens)
        stage = self.latency
        stage.labels(a.model, "queue").observe(a.queue_wait_s)
        stage.labels(a.model, "engine").observe(a.engine_s)
        if a.ttft_s is not None:
            stage.labels(a.model, "ttft").observe(a.ttft_s)
        if a.client_ttft_s is not None:
            stage.labels(a.model, "client_ttft").observe(a.client_ttft_s)
        if outcome is Outcome.SUCCEEDED:
            ran_s = (a.finished_at - a.started_at).total_seconds()
            stage.labels(a.model, "end_to_end").observe(a.queue_wait_s + ran_s)

    def serve(self, port: int, host: str = "127.0.0.1", *, probes: Probes) -> Any:
        """Expose ``/metrics``, with ``/healthz`` and ``/readyz`` (workers.probes), on a daemon
        thread; returns the server, to shut it down."""
        server = serve_probes(self.registry, probes, port, host)
        log.info("worker metrics on http://%s:%d/metrics", host, port)
        return server
