"""Start an API and workers of one's own, on a config of one's own, against the session's
database and Redis (for tests that need their own models and routes)."""

from __future__ import annotations

from pathlib import Path

from core.settings import Settings
from tests.conftest import Process, service_env
from tests.conftest import start_api as start_env_api
from tests.conftest import start_workers as start_env_workers


def own_settings(settings: Settings, config: Path) -> Settings:
    return settings.model_copy(update={"config": config})


def start_api(settings: Settings, log_dir: Path, name: str) -> tuple[Process, str]:
    """`inferq api` on these settings, on a free port, once it answers /healthz."""
    return start_env_api(service_env(settings), log_dir, name)


def start_workers(
    settings: Settings, log_dir: Path, models: list[str], *, tag: str
) -> dict[str, Process]:
    """One `inferq worker` per model on these settings, once each is ready."""
    return start_env_workers(service_env(settings), log_dir, models, tag=tag)
