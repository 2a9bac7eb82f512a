"""A worker's Kubernetes probes, on its metrics port: ``/readyz`` once the engine has loaded,
``/healthz`` while the engine makes progress (workers.probes).

One real `inferq worker` process on a scripted model shows the probes as a kubelet sees them,
idle and busy; the probe server in-process shows the answers the process cannot be made to
give on cue (loading, and stalled: a stalled worker exits 70 the moment it is, see
tests/test_engine_wedge.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.enums import RequestStatus
from core.settings import Settings
from router import load_config
from storage.tables import Request
from tasks.app import create_celery, publish_runs
from tests.conftest import (
    START_TIMEOUT_S,
    TEST_CONFIG,
    Process,
    free_port,
    queued_runs,
    service_env,
    start,
    stop,
    wait_for,
)
from tests.stack import own_settings
from workers.metrics import WorkerMetrics
from workers.probes import Probes

MODEL = "probed"


@pytest.fixture(scope="module")
def probed(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    folder = tmp_path_factory.mktemp("probes")
    config = yaml.safe_load(TEST_CONFIG.read_text())
    config["models"][MODEL] = {
        "engine": "scripted",
        "path": "builtin:tiny",
        "max_batch_size": 4,
        "batch_window_ms": 10,
        "options": {"rules": [{"match": "SLOW", "delay_s": 3.0}]},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return own_settings(settings, path)


@pytest.fixture(scope="module")
def worker(probed: Settings, log_dir: Path) -> Iterator[tuple[Process, str]]:
    from weights.tiny import ensure_tiny_model

    ensure_tiny_model(probed.model_cache)
    port = free_port()
    args = ["worker", "--model", MODEL, "--metrics-port", str(port)]
    process = start("probes-worker", args, service_env(probed), log_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: _status(process, f"{url}/readyz") == 200,
            timeout=START_TIMEOUT_S,
            what="/readyz",
        )
        yield process, url
    finally:
        stop(process)


def _status(process: Process, url: str) -> int | None:
    if process.proc.poll() is not None:
        pytest.fail(f"{process.name} exited:\n{process.tail()}")
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


def test_a_loaded_worker_is_ready_and_live_and_still_serves_metrics(
    worker: tuple[Process, str],
) -> None:
    process, url = worker
    assert _status(process, f"{url}/readyz") == 200
    assert _status(process, f"{url}/healthz") == 200
    metrics = httpx.get(f"{url}/metrics", timeout=5)
    assert metrics.status_code == 200
    assert "# TYPE inferq_batch_size histogram" in metrics.text
    assert "inferq_batch_size" not in httpx.get(f"{url}/healthz", timeout=5).text


def test_a_worker_running_a_long_batch_stays_live(
    worker: tuple[Process, str],
    probed: Settings,
    sessions: sessionmaker[Session],
    tenant_id: uuid.UUID,
) -> None:
    """A batch that takes seconds is progress, not a stall: the probe must not restart it."""
    process, url = worker
    [run] = queued_runs(sessions, tenant_id, ["SLOW one"], model=MODEL)
    config = load_config(probed.config)
    publish_runs(create_celery(probed, config), config, [run])
    request_id = uuid.UUID(run.request_id)

    def status() -> RequestStatus:
        with sessions() as session:
            return session.scalars(select(Request.status).where(Request.id == request_id)).one()

    wait_for(lambda: status() is RequestStatus.RUNNING, timeout=60, what="the batch to start")
    assert _status(process, f"{url}/healthz") == 200
    assert _status(process, f"{url}/readyz") == 200
    wait_for(lambda: status() is RequestStatus.SUCCEEDED, timeout=60, what="the batch to end")
    assert _status(process, f"{url}/healthz") == 200


def test_probe_answers_while_loading_and_once_stalled() -> None:
    probes, stalled = Probes(), [False]
    port = free_port()
    server = WorkerMetrics().serve(port, probes=probes)
    url = f"http://127.0.0.1:{port}"
    try:
        # Loading: alive (the startup probe waits), not ready.
        assert httpx.get(f"{url}/readyz").status_code == 503
        assert httpx.get(f"{url}/healthz").status_code == 200
        probes.started(lambda: not stalled[0])
        assert httpx.get(f"{url}/readyz").status_code == 200
        assert httpx.get(f"{url}/healthz").status_code == 200
        stalled[0] = True  # the engine's step or call ran past INFERQ_ENGINE_STALL_S
        assert httpx.get(f"{url}/healthz").status_code == 503
        assert httpx.get(f"{url}/readyz").status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 200
    finally:
        server.shutdown()
        server.server_close()
