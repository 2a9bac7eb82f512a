"""Flower, as a real process, sees the inference path: every model queue a worker consumes
(batch and interactive) with its depth, and a busy worker answers its inspect calls."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.enums import RequestStatus
from core.settings import Settings
from router import load_config
from storage.tables import Request
from tasks.app import create_celery
from tasks.queues import model_queues
from tests.conftest import (
    Process,
    free_port,
    publish_bundled,
    queued_runs,
    service_env,
    start,
    stop,
    wait_for,
)
from tests.stack import own_settings, start_workers

MODEL = "flowered"
BUNDLE = 4
# Every batch takes a second: the engine stays busy for the whole test.
SPEC = {
    "engine": "scripted",
    "path": "builtin:tiny",
    "max_batch_size": BUNDLE,
    "batch_window_ms": 10,
    "options": {"rules": [{"match": "BUSY", "delay_s": 1.0}]},
}
AUTH = ("ops", f"pw-{uuid.uuid4().hex}")
INSPECTED = ("stats", "active_queues", "registered", "conf")


@pytest.fixture
def own(settings: Settings, tmp_path: Path) -> Settings:
    config = tmp_path / "models.yaml"
    routes = [{"task": "*", "model": MODEL}]
    config.write_text(yaml.safe_dump({"models": {MODEL: SPEC}, "routes": routes}))
    return own_settings(settings, config)


@pytest.fixture
def flower_url(own: Settings, tmp_path: Path) -> Iterator[str]:
    """`inferq flower` with basic auth on a free port, once it answers."""
    port = free_port()
    args = ["flower", f"--port={port}", "--address=127.0.0.1", f"--basic-auth={':'.join(AUTH)}"]
    process = start("flower", args, service_env(own), tmp_path)
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if process.proc.poll() is not None:
            pytest.fail(f"flower exited:\n{process.tail()}")
        try:
            return httpx.get(f"{url}/healthcheck", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(answers, timeout=120, what="flower to answer")
    yield url
    stop(process)


def test_flower_lists_model_queues_and_inspects_a_busy_worker(
    own: Settings,
    sessions: sessionmaker[Session],
    tenant_id: uuid.UUID,
    flower_url: str,
    tmp_path: Path,
) -> None:
    config = load_config(own.config)
    workers = start_workers(own, tmp_path, [MODEL], tag="flower")
    # 15 bundles of 4 one-second requests; the worker holds 2 batches' worth at a time.
    runs = queued_runs(sessions, tenant_id, [f"BUSY {i}" for i in range(60)], model=MODEL)
    ids = [uuid.UUID(r.request_id) for r in runs]
    try:
        publish_bundled(create_celery(own, config), config, runs, bundle=BUNDLE)
        wait_for(lambda: _running(sessions, ids) > 0, timeout=60, what="the engine to be busy")
        _check(flower_url, workers[MODEL], bundles=len(runs) // BUNDLE)
        assert _running(sessions, ids) > 0, "the job ended before Flower was asked"
    finally:
        for process in workers.values():
            stop(process)
        with sessions.begin() as session:  # what is left never runs
            session.execute(
                update(Request).where(Request.id.in_(ids)).values(status=RequestStatus.CANCELLED)
            )


def _running(sessions: sessionmaker[Session], ids: list[uuid.UUID]) -> int:
    with sessions() as session:
        query = select(func.count()).where(
            Request.id.in_(ids), Request.status == RequestStatus.RUNNING
        )
        return int(session.scalar(query) or 0)


def _get(url: str) -> Any:
    response = httpx.get(url, auth=AUTH, timeout=30)
    response.raise_for_status()
    return response.json()


def _check(url: str, worker: Process, *, bundles: int) -> None:
    """Flower inspects the busy worker (its default 1 s inspect timeout) and measures the
    queues that worker reports."""
    seen: dict[str, Any] = {}

    def inspected() -> bool:
        if worker.proc.poll() is not None:
            pytest.fail(f"{worker.name} exited:\n{worker.tail()}")
        seen.update(_get(f"{url}/api/workers?refresh=1"))
        mine = [info for name, info in seen.items() if name.startswith(f"{MODEL}.")]
        return bool(mine) and all(method in mine[0] for method in INSPECTED)

    wait_for(inspected, timeout=60, what=f"flower to inspect the busy worker ({list(seen)})")
    [info] = [info for name, info in seen.items() if name.startswith(f"{MODEL}.")]
    batch, interactive = model_queues(MODEL)
    assert {batch, interactive} <= {q["name"] for q in info["active_queues"]}
    lengths = _get(f"{url}/api/queues/length")["active_queues"]
    depth = {q["name"]: q["messages"] for q in lengths}
    assert {batch, interactive} <= set(depth), depth
    # Broker messages, each a bundle of requests; some are held by the worker.
    assert 0 < depth[batch] < bundles, depth
    assert depth[interactive] == 0, depth
