"""Typed settings, built once per process and passed in.

Nothing here reads the environment at import: call :func:`load_settings` (or construct
:class:`Settings`) in the entry point and hand the object down.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.enums import TaskKind

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
    # Redis Sentinel, for a highly available broker: a ``sentinel://`` broker URL names the
    # sentinels (``sentinel://:PASSWORD@s1:26379/0;sentinel://:PASSWORD@s2:26379/0``), this
    # the master they watch; ``broker_sentinel_password`` is the sentinels' own, if any.
    broker_master_name: str = ""
    broker_sentinel_password: str = ""
    # Bounded long-poll on GET /v1/requests/{id}?wait=...; a tenant holds at most
    # ``max_waits_per_tenant`` long polls (and waiting chat completions) per API process.
    max_wait_s: float = 30.0
    max_waits_per_tenant: int = Field(default=100, ge=1)
    # Abuse limits, checked before anything is written: the body's bytes (uploads have their
    # own, below), tokens generated per request (also at most the model's context less the
    # prompt), and variants per request (``expand``'s ``n``).
    max_body_bytes: int = 1_000_000
    max_output_tokens: int = 4096
    max_n: int = 16
    # A caller's JSON schema (extract, chat's json_schema, response_format): characters of
    # its JSON text and levels of nesting. Its regexes must compile in RE2 (tasks.schema_guard).
    max_schema_chars: int = Field(default=100_000, gt=0)
    max_schema_depth: int = Field(default=32, gt=0)
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
    # The JSON form of ``POST /v1/jobs`` is parsed whole, so it gets a smaller cap than a
    # JSONL upload (which is counted line by line as it is read).
    max_job_json_bytes: int = 4_000_000
    # Retention: the bytes of uploaded files a tenant may keep (0: no quota); ``inferq prune``
    # removes old files and request payloads.
    tenant_file_quota_bytes: int = 2_000_000_000
    # Uploads up to this many lines are validated before the answer (a strict refusal is a
    # 4xx); longer ones are answered ``validating`` at once and admitted in the background,
    # a small first chunk first, then chunks as long as all lines before them up to
    # ``admission_chunk_lines``, pausing while a job has ``admission_max_open`` requests
    # waiting so one job never floods a queue. A job whose admission fails for a reason not
    # its lines' is retried, with backoff, up to ``admission_max_attempts`` times in a row,
    # then fails with the reason.
    inline_job_lines: int = 2000
    admission_first_chunk: int = 200
    admission_chunk_lines: int = 2000
    admission_max_open: int = 5000
    admission_max_attempts: int = Field(default=5, ge=1)
    # Durability. A worker renews the lease of what it runs; past ``running_lease_s`` without
    # renewal (the worker died) the reconciler re-publishes it, as it does a request queued
    # past ``queued_lease_s`` (its message was lost). A request delivered more than
    # ``max_deliveries`` times is failed with the reason. The API runs a reconciler unless
    # ``reconciler`` is off (run ``inferq reconcile`` instead, or several: they share work).
    running_lease_s: float = 20.0
    queued_lease_s: float = 120.0
    reconcile_interval_s: float = 5.0
    max_deliveries: int = 5
    reconciler: bool = True
    # On SIGTERM a worker takes no more messages, hands back at once what it holds unstarted,
    # and lets its engine finish what it runs for up to this long (unset: the model's
    # ``timeout_s``, or 120 s); then commits, acknowledges and exits. A supervisor must wait
    # this plus ~30 s (Kubernetes terminationGracePeriodSeconds, compose stop_grace_period).
    drain_grace_s: float | None = Field(default=None, gt=0)
    # A continuous engine holding requests that returns no step for this long is wedged:
    # the worker exits non-zero (its supervisor restarts it; the reconciler re-runs its work).
    engine_stall_s: float = Field(default=60.0, gt=0)
    # Backpressure (429 with Retry-After; bulk admission waits instead): requests waiting per
    # model (interactive requests count only interactive ones), a tenant's requests in flight,
    # and a tenant's tokens per minute, prompt plus ``max_tokens`` x n reserved, the unused
    # output settled when the request finishes (0: unlimited). See submission/limits.py.
    max_queued_per_model: int = 100_000
    max_inflight_per_tenant: int = 50_000
    tenant_tokens_per_minute: int = 0
    # API keys: each API process caches a resolved key (and an unknown one) this long, so a
    # revoked key stops working within it. Database lookups of keys not in the cache are
    # throttled per client address (a burst, then a rate; a success costs nothing): past it
    # the API answers 429 without asking the database. See api/auth.py.
    auth_cache_ttl_s: float = Field(default=30.0, gt=0)
    auth_miss_burst: int = Field(default=20, ge=1)
    auth_miss_per_s: float = Field(default=2.0, gt=0)
    # When set, GET /metrics needs ``Authorization: Bearer <metrics_token>``.
    metrics_token: str = ""
    # Webhooks: delivery attempts before giving up, per-attempt timeout, and whether URLs
    # may point at loopback/private addresses (tests and closed networks only).
    webhook_max_attempts: int = 8
    webhook_timeout_s: float = 10.0
    webhook_allow_private: bool = False
    # Slow or hostile receivers: an attempt ends ``webhook_deadline_s`` after it began whatever
    # the receiver trickles; an endpoint has at most ``webhook_endpoint_concurrency`` attempts
    # in flight per webhook worker (``webhook_concurrency`` threads); a host lookup gets
    # ``webhook_dns_timeout_s``. A tenant replays at most ``webhook_replays_per_minute``
    # deliveries a minute, each at most once a minute. After a secret rotation the old secret
    # keeps signing (beside the new one) for ``webhook_rotation_grace_s``.
    webhook_deadline_s: float = Field(default=15.0, gt=0)
    webhook_concurrency: int = Field(default=32, ge=1)
    webhook_endpoint_concurrency: int = Field(default=2, ge=1)
    webhook_dns_timeout_s: float = Field(default=2.0, gt=0)
    webhook_replays_per_minute: int = Field(default=30, ge=1)
    webhook_rotation_grace_s: float = Field(default=86400.0, ge=0)
    # Evaluation pool: the share of succeeded requests copied (PII-stripped) into the pool,
    # per task kind (``eval_task_shares`` overrides ``eval_sample_share``), the rows kept per
    # kind, and the tenants that opted in (tenant ids, or "*" for all). Off by default.
    eval_sample_share: float = Field(default=0.0, ge=0, le=1)
    eval_task_shares: dict[str, float] = Field(default_factory=dict)
    eval_window: int = Field(default=1000, gt=0)
    eval_tenants: list[str] = Field(default_factory=list)
    # Evaluation runs (``inferq eval``): a replay waits at most ``eval_timeout_s``; a drop in a
    # task kind's score beyond ``eval_threshold`` is a regression. The schedule (``inferq eval
    # beat``, cron ``eval_cron``, weekly by default) runs each of ``eval_candidates`` against
    # ``eval_reference`` (``pool``, ``gold`` or a model) on ``eval_tasks`` and posts
    # ``eval.regression`` to ``eval_webhook_url``. Replays are submitted as ``eval_tenant``.
    eval_timeout_s: float = Field(default=3600.0, gt=0)
    eval_threshold: float = Field(default=0.02, ge=0, le=1)
    eval_candidates: list[str] = Field(default_factory=list)
    eval_reference: str = "pool"
    eval_tasks: list[TaskKind] = Field(default_factory=lambda: [TaskKind.EXTRACT])
    eval_cron: str = "0 3 * * 1"
    eval_webhook_url: str = ""
    eval_tenant: str = "inferq-eval"
    # The API and workers reload the models config when its file changes or a canary decision
    # is recorded, looking every ``config_poll_s`` seconds (and at once on SIGHUP). Canary
    # policy decisions (``canary.auto`` on a route) post ``canary.promoted`` / ``canary.aborted``
    # to ``canary_webhook_url`` (unset: ``eval_webhook_url``), signed like every delivery.
    config_poll_s: float = Field(default=3.0, gt=0)
    canary_webhook_url: str = ""
    canary_policy_interval_s: float = Field(default=300.0, gt=0)  # sent by ``inferq eval beat``

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.cache_dir / 'inferq.db'}"
        if not self.broker_url:
            self.broker_url = MEMORY_BROKER
        return self

    @model_validator(mode="after")
    def _sentinel_needs_a_master(self) -> Settings:
        if self.broker_url.startswith("sentinel://") and not self.broker_master_name:
            raise ValueError("a sentinel:// broker URL needs INFERQ_BROKER_MASTER_NAME")
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
