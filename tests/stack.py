"""Start an API and workers of one's own, on a config of one's own, against the session's
database and Redis (for tests that need their own models and routes)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from inferq.settings import Settings
from tests.conftest import START_TIMEOUT_S, Process, free_port, service_env, start, wait_for
from tests.conftest import start_workers as start_env_workers


def own_settings(settings: Settings, config: Path) -> Settings:
    return settings.model_copy(update={"config": config})


def start_api(settings: Settings, log_dir: Path, name: str) -> tuple[Process, str]:
    """`inferq api` on a free port, once it answers /healthz."""
    port = free_port()
    process = start(name, ["api", "--port", str(port)], service_env(settings), log_dir)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if process.proc.poll() is not None:
            pytest.fail(f"{name} exited:\n{process.tail()}")
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, timeout=START_TIMEOUT_S, what=f"{name} to answer /healthz")
    return process, url


def start_workers(
    settings: Settings, log_dir: Path, models: list[str], *, tag: str
) -> dict[str, Process]:
    """One `inferq worker` per model on these settings, once each is ready."""
    return start_env_workers(service_env(settings), log_dir, models, tag=tag)
