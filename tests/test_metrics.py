"""Prometheus metrics from real processes: the API's queue gauges and a worker's counters.

The API and a worker run as `inferq` processes on a copy of tests/config.yaml with one more
scripted model, ``metered``, that only this module's worker serves, so its counters are exact.
``parked`` has no worker: what is submitted to it stays on its queue.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.enums import RequestStatus
from core.settings import Settings
from storage.ledger_stats import GroupBy, Window, fetch_attempts, summarise
from storage.tables import LedgerEntry, Request
from tasks.queues import model_queue
from tests.conftest import (
    START_TIMEOUT_S,
    TEST_CONFIG,
    Process,
    free_port,
    service_env,
    start,
    stop,
    wait_for,
)
from tests.test_compose import ROOT, SERVICES, command_of, parse_inferq, worker_services

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass(frozen=True)
class Stack:
    api_url: str
    worker_metrics_url: str


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def stack(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from weights.tiny import ensure_tiny_model

    ensure_tiny_model(settings.model_cache)  # the API counts prompt tokens with its tokenizer
    folder = tmp_path_factory.mktemp("metrics")
    config = yaml.safe_load(TEST_CONFIG.read_text())
    config["models"]["metered"] = {
        "engine": "scripted",
        "path": "builtin:tiny",
        "max_batch_size": 4,
        "batch_window_ms": 50,
        "price_per_gpu_hour": 3.6,
        "options": {"delay_ms": 10, "rules": [{"match": "POISON", "fail": "poisoned"}]},
    }
    config_file = folder / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = service_env(settings.model_copy(update={"config": config_file}))
    api_port, metrics_port = free_port(), free_port()
    worker_args = ["worker", "--model", "metered", "--metrics-port", str(metrics_port)]
    processes = [
        start("metrics-worker", worker_args, env, folder),
        start("metrics-api", ["api", "--port", str(api_port)], env, folder),
    ]
    stack = Stack(f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{metrics_port}/metrics")
    try:
        wait_for(lambda: _ready(processes, stack), timeout=START_TIMEOUT_S, what="metrics stack")
        yield stack
    finally:
        for process in processes:
            stop(process)


def _ready(processes: list[Process], stack: Stack) -> bool:
    for process in processes:
        if process.proc.poll() is not None:
            pytest.fail(f"{process.name} exited:\n{process.tail()}")
    if "ready." not in processes[0].log.read_text(errors="replace"):
        return False
    try:
        return all(
            httpx.get(url, timeout=2).status_code == 200
            for url in (f"{stack.api_url}/healthz", stack.worker_metrics_url)
        )
    except httpx.HTTPError:
        return False


@pytest.fixture
def api(stack: Stack, api_key: str) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=stack.api_url, headers=headers, timeout=60) as http:
        yield http


def redis_depth(settings: Settings, model: str) -> tuple[int, int]:
    """Messages on a model's queue counted straight from Redis, and how many lists hold them.

    Kombu keeps a queue as one list per priority step: ``name`` and ``name\\x06\\x16<n>``.
    """
    client = redis.Redis.from_url(settings.broker_url)
    keys = list(client.scan_iter(f"{settings.broker_key_prefix}{model_queue(model)}*"))
    return sum(client.llen(k) for k in keys), sum(client.llen(k) > 0 for k in keys)


def queued_in_db(sessions: sessionmaker[Session], model: str) -> int:
    with sessions() as session:
        return session.scalar(
            select(func.count())
            .select_from(Request)
            .where(Request.model == model, Request.status == RequestStatus.QUEUED)
        )


def test_api_metrics_show_a_parked_queue(
    stack: Stack, api: httpx.Client, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    before = queued_in_db(sessions, "parked")
    for priority in ("interactive", "interactive", "batch"):
        body = {"task": "complete", "input": {"prompt": "wait"}, "model": "parked"}
        response = api.post("/v1/requests", json={**body, "priority": priority})
        assert response.status_code == 202, response.text
    metrics_url = f"{stack.api_url}/metrics"
    seen: dict[str, float] = {}

    def agrees() -> bool:
        samples = scrape(metrics_url)
        seen["messages"] = value(samples, "inferq_queue_messages", model="parked")
        seen["queued"] = value(samples, "inferq_queued_requests", model="parked")
        seen["age"] = value(samples, "inferq_oldest_queued_age_seconds", model="parked")
        depth, _lists = redis_depth(settings, "parked")
        return seen["messages"] == depth and seen["queued"] == queued_in_db(sessions, "parked")

    wait_for(agrees, timeout=60, what="/metrics to agree with Redis and Postgres")
    assert seen["queued"] >= before + 3
    depth, lists = redis_depth(settings, "parked")
    assert depth >= 2 and lists >= 2, "interactive and batch priorities use separate lists"
    assert seen["age"] > 0
    # Nobody serves parked: its oldest request only ages (once the cached snapshot renews).
    first_age = seen["age"]
    wait_for(
        lambda: (
            value(scrape(metrics_url), "inferq_oldest_queued_age_seconds", model="parked")
            > first_age
        ),
        timeout=60,
        what="the oldest parked request to age",
    )
    samples = scrape(metrics_url)
    assert ("inferq_queue_messages", frozenset({("model", "metered")})) in samples
    assert value(samples, "inferq_queued_requests", model="metered") >= 0


def test_worker_metrics_count_batches_outcomes_and_cost(
    stack: Stack, api: httpx.Client, sessions: sessionmaker[Session]
) -> None:
    since = datetime.now(UTC) - timedelta(seconds=1)
    texts = ["alpha", "beta gamma", "POISON here", "delta", "epsilon zeta eta", "theta"]
    ids = []
    for text in texts:
        body = {"task": "complete", "input": {"prompt": text}, "model": "metered"}
        response = api.post("/v1/requests", json=body)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])

    def finished() -> bool:
        return all(
            api.get(f"/v1/requests/{i}", params={"wait": 5}).json()["status"]
            in ("succeeded", "failed")
            for i in ids
        )

    wait_for(finished, timeout=120, what="metered requests to finish")

    def counted() -> bool:
        samples = scrape(stack.worker_metrics_url)
        labels = {"model": "metered", "task": "complete"}
        outcomes = ("succeeded", "failed")
        return (
            sum(value(samples, "inferq_attempts_total", **labels, outcome=o) for o in outcomes) >= 6
        )

    wait_for(counted, timeout=60, what="the worker's counters")
    samples = scrape(stack.worker_metrics_url)
    attempts = {
        outcome: value(
            samples, "inferq_attempts_total", model="metered", task="complete", outcome=outcome
        )
        for outcome in ("succeeded", "failed", "duplicate")
    }
    assert attempts == {"succeeded": 5.0, "failed": 1.0, "duplicate": 0.0}
    # Every request ran in exactly one batch: the batch sizes add up to the requests.
    assert value(samples, "inferq_batch_size_sum", model="metered") == 6.0
    batches = value(samples, "inferq_batch_size_count", model="metered")
    assert 2 <= batches <= 6  # at most 4 a batch
    stage = {"model": "metered"}
    assert value(samples, "inferq_latency_seconds_count", **stage, stage="queue") == 6.0
    assert value(samples, "inferq_latency_seconds_count", **stage, stage="end_to_end") == 5.0
    # Time to first token as the client sees it, for every attempt that made a token.
    assert value(samples, "inferq_latency_seconds_count", **stage, stage="client_ttft") == 5.0

    with sessions() as session:
        rows = session.scalars(select(LedgerEntry).where(LedgerEntry.model == "metered")).all()
        window = Window(since, datetime.now(UTC) + timedelta(seconds=1))
        groups, _ = summarise(fetch_attempts(session, window), window, GroupBy.MODEL)
    completion = sum(r.completion_tokens for r in rows)
    assert completion > 0
    assert value(samples, "inferq_tokens_total", model="metered", kind="completion") == completion
    cost = sum(value(samples, "inferq_cost_total", model="metered", outcome=o) for o in attempts)
    assert cost == pytest.approx(sum(r.cost for r in rows))
    # The report over the same window agrees with the worker's counters.
    [metered] = [g for g in groups if g.key == "metered"]
    assert (metered.attempts, metered.successes) == (6, 5)
    assert metered.cost == pytest.approx(cost)


def test_metrics_endpoint_needs_no_key(stack: Stack) -> None:
    response = httpx.get(f"{stack.api_url}/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "# TYPE inferq_oldest_queued_age_seconds gauge" in response.text


def exposed_series(url: str) -> set[str]:
    """Every series name a /metrics page can carry, samples or not (from HELP/TYPE too)."""
    response = httpx.get(url, timeout=30)
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    return {
        family.name + suffix
        for family in text_string_to_metric_families(response.text)
        for suffix in suffixes.get(family.type, [""])
    }


def test_dashboard_and_scrape_config_match_what_is_exposed(stack: Stack) -> None:
    exposed = exposed_series(f"{stack.api_url}/metrics") | exposed_series(stack.worker_metrics_url)
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "inferq.json").read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in queries for name in re.findall(r"\binferq_\w+", expr)}
    assert used and used <= exposed, f"not exposed: {sorted(used - exposed)}"
    assert {"inferq_queue_messages", "inferq_oldest_queued_age_seconds"} <= used

    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = {
        target
        for job in scrape["scrape_configs"]
        for group in job["static_configs"]
        for target in group["targets"]
    }
    api = parse_inferq(command_of(SERVICES["api"]))
    expected = {f"api:{api.params['port']}"}
    for name in worker_services():
        worker = parse_inferq(command_of(SERVICES[name]))
        assert worker.params["metrics_host"] == "0.0.0.0", f"{name}: reachable by Prometheus"
        expected.add(f"{name}:{worker.params['metrics_port']}")
    assert targets == expected
