"""Typed settings, built once per process and passed in.

Nothing here reads the environment at import: call :func:`load_settings` (or construct
:class:`Settings`) in the entry point and hand the object down.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_CONFIG = Path(__file__).parent / "default_config.yaml"
MEMORY_BROKER = "memory://localhost//"


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "inferq"


class Settings(BaseSettings):
    """Everything a process of inferq needs to know, from ``INFERQ_*`` variables.

    With neither ``database_url`` nor ``broker_url`` set, inferq runs embedded: SQLite in the
    cache folder, Celery's in-process ``memory://`` broker and an in-process worker.
    """

    model_config = SettingsConfigDict(env_prefix="INFERQ_", extra="ignore")

    database_url: str = ""
    broker_url: str = ""
    config: Path = DEFAULT_CONFIG
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    # Where built or downloaded models live; defaults to ``cache_dir / "models"``.
    models_dir: Path | None = None

    # How long the broker keeps an unacknowledged message before handing it to another
    # worker. It must outlast the longest time a message waits in a worker's buffer plus
    # the longest batch, or Redis redelivers work that is still running.
    visibility_timeout_s: int = 3600
    # Prefix for every Redis key the broker uses: lets deployments (or test sessions) share
    # one Redis without seeing each other's queues.
    broker_key_prefix: str = ""
    # Bounded long-poll on GET /v1/requests/{id}?wait=...
    max_wait_s: float = 30.0
    max_body_bytes: int = 1_000_000
    max_output_tokens: int = 4096
    worker_name: str = ""
    # Where the CLI's client commands (submit, jobs, results) find the API.
    api_url: str = "http://127.0.0.1:8000"
    api_key: str = ""
    # Celery task events (received/started/succeeded) let Flower list every task, at the cost
    # of three Redis publishes per request in the worker; workers and queues show without them.
    task_events: bool = False
    # Bulk jobs.
    max_job_lines: int = 200_000
    max_line_bytes: int = 100_000
    max_upload_bytes: int = 200_000_000
    # Uploads up to this many lines are validated before the answer (a strict refusal is a
    # 4xx); longer ones are answered ``validating`` at once and admitted in the background,
    # a small first chunk first, then ``admission_chunk_lines`` at a time, pausing while a
    # job has ``admission_max_open`` requests waiting so one job never floods a queue.
    inline_job_lines: int = 2000
    admission_first_chunk: int = 200
    admission_chunk_lines: int = 2000
    admission_max_open: int = 5000
    # Webhooks: delivery attempts before giving up, per-attempt timeout, and whether URLs
    # may point at loopback/private addresses (tests and closed networks only).
    webhook_max_attempts: int = 8
    webhook_timeout_s: float = 10.0
    webhook_allow_private: bool = False

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.cache_dir / 'inferq.db'}"
        if not self.broker_url:
            self.broker_url = MEMORY_BROKER
        return self

    @property
    def model_cache(self) -> Path:
        """Where built models live: ``models_dir``, or ``cache_dir / "models"``."""
        return self.models_dir or self.cache_dir / "models"

    @property
    def embedded(self) -> bool:
        """True when the broker lives in this process (the embedded default)."""
        return self.broker_url.startswith("memory://")


def load_settings(**overrides: object) -> Settings:
    """Build the settings from the environment, with explicit overrides winning."""
    return Settings(**overrides)  # type: ignore[arg-type]
