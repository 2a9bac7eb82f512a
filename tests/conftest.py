"""Fixtures on real services: a fresh Postgres database and Redis db per session, the API and
workers as real `inferq` processes, the real vLLM engine on the tiny model.

A missing Postgres or Redis fails the session; nothing is skipped.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from celery import Celery
from sqlalchemy import Engine as DbEngine
from sqlalchemy.orm import Session, sessionmaker

from core.enums import Priority, RequestStatus, TaskKind
from core.settings import Settings
from router.config import RouterConfig
from storage.db import make_engine, make_sessionmaker
from storage.migrate import scratch_database
from storage.tables import Request
from storage.tenants import create_tenant
from tasks.app import publish_runs
from tasks.contract import RunMessage
from tasks.rows import run_message
from workers.engines import Engine
from workers.runtime import WorkerRuntime

ROOT = Path(__file__).resolve().parents[1]
TEST_CONFIG = Path(__file__).parent / "config.yaml"
PG_URL = os.environ.get("INFERQ_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("INFERQ_TEST_REDIS_URL", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("INFERQ_TEST_REDIS_DB", "11"))
MODELS_DIR = Path(os.environ.get("INFERQ_TEST_MODELS_DIR", ROOT / ".cache" / "models"))
START_TIMEOUT_S = 180.0


def wait_for(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Poll a condition with a generous bound; fail with ``what`` if it never holds."""
    deadline = time.monotonic() + timeout
    pause = 0.02
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(pause)
        pause = min(pause * 2, 0.5)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A database of its own for this session, migrated to head, dropped at the end."""
    try:
        with scratch_database(PG_URL, "inferq_test") as url:
            yield url
    except psycopg.OperationalError as exc:
        pytest.fail(f"Postgres is required at {PG_URL}: {exc}")


BROKER_PREFIX = f"inferq-test-{uuid.uuid4().hex[:8]}:"


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    """Redis, shared with anything else there: this session's keys carry BROKER_PREFIX."""
    url = f"{REDIS_URL}/{REDIS_DB}"
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis is required at {REDIS_URL}: {exc}")
    yield url
    for key in client.scan_iter(f"{BROKER_PREFIX}*"):
        client.delete(key)


@pytest.fixture(scope="session")
def settings(database_url: str, broker_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        broker_url=broker_url,
        config=TEST_CONFIG,
        models_dir=MODELS_DIR,
        cache_dir=ROOT / ".cache",
        # Sessions running at once share Redis; each sees only its own queues.
        broker_key_prefix=BROKER_PREFIX,
    )


@pytest.fixture(scope="session")
def db_engine(settings: Settings) -> Iterator[DbEngine]:
    engine = make_engine(settings.database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def sessions(db_engine: DbEngine) -> sessionmaker[Session]:
    return make_sessionmaker(db_engine)


@dataclass(frozen=True, slots=True)
class NewTenant:
    id: uuid.UUID
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def new_tenant(sessions: sessionmaker[Session], prefix: str = "tenant") -> NewTenant:
    """A fresh tenant and its API key, in the database ``sessions`` opens."""
    with sessions.begin() as session:
        row, key = create_tenant(session, f"{prefix}-{uuid.uuid4().hex[:8]}")
        return NewTenant(row.id, key)


@pytest.fixture
def tenant(sessions: sessionmaker[Session]) -> NewTenant:
    """A fresh tenant per test, with its key: tests never see each other's requests."""
    return new_tenant(sessions)


@pytest.fixture
def api_key(sessions: sessionmaker[Session]) -> str:
    """A fresh tenant's key, for tests that only call the API."""
    return new_tenant(sessions).key


@pytest.fixture
def tenant_id(sessions: sessionmaker[Session]) -> uuid.UUID:
    """A fresh tenant's id, for tests that write rows themselves."""
    return new_tenant(sessions).id


def service_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        INFERQ_DATABASE_URL=settings.database_url,
        INFERQ_BROKER_URL=settings.broker_url,
        INFERQ_CONFIG=str(settings.config),
        INFERQ_CACHE_DIR=str(settings.cache_dir),
        INFERQ_MODELS_DIR=str(settings.model_cache),
        INFERQ_BROKER_KEY_PREFIX=settings.broker_key_prefix,
        # A stopped worker drains what its engine runs for this long at most (in service, the
        # model's timeout_s): teardowns do not wait on parked or long work.
        INFERQ_DRAIN_GRACE_S="5",
        PYTHONUNBUFFERED="1",
    )
    return env


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def start(name: str, args: list[str], env: dict[str, str], log_dir: Path) -> Process:
    log = log_dir / f"{name}.log"
    handle = log.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "inferq.cli", *args],
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    return Process(name, proc, log)


def stop(process: Process) -> None:
    process.proc.terminate()
    try:
        process.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.proc.kill()
        process.proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def workers(settings: Settings, log_dir: Path) -> Iterator[dict[str, Process]]:
    """`inferq worker` processes for the real tiny model and the scripted one."""
    from weights.tiny import ensure_tiny_model

    ensure_tiny_model(settings.model_cache)  # built once, before two processes want it
    running = start_workers(service_env(settings), log_dir, ["tiny", "scripted"], tag="session")
    yield running
    for process in running.values():
        stop(process)


def start_workers(
    env: dict[str, str], log_dir: Path, models: list[str], *, tag: str
) -> dict[str, Process]:
    """One `inferq worker` per model, once each has logged that it is ready."""
    running = {
        model: start(f"{tag}-worker-{model}", ["worker", "--model", model], env, log_dir)
        for model in models
    }

    def ready() -> bool:
        for process in running.values():
            if process.proc.poll() is not None:
                pytest.fail(f"{process.name} exited:\n{process.tail()}")
        return all("ready." in p.log.read_text(errors="replace") for p in running.values())

    wait_for(ready, timeout=START_TIMEOUT_S, what=f"{tag} workers to be ready")
    return running


@pytest.fixture(scope="session")
def api_url(settings: Settings, log_dir: Path, workers: dict[str, Process]) -> Iterator[str]:
    """`inferq api` as a real process on a free port."""
    process, url = start_api(service_env(settings), log_dir, "api")
    yield url
    stop(process)


def start_api(env: dict[str, str], log_dir: Path, name: str) -> tuple[Process, str]:
    """`inferq api` on a free port, once it answers /healthz."""
    port = free_port()
    process = start(name, ["api", "--port", str(port)], env, log_dir)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(process, url)
    return process, url


def wait_healthy(process: Process, url: str) -> None:
    """Wait until an `inferq api` answers /healthz; fail with its log if it exits."""

    def healthy() -> bool:
        if process.proc.poll() is not None:
            pytest.fail(f"{process.name} exited:\n{process.tail()}")
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, timeout=START_TIMEOUT_S, what=f"{process.name} to answer /healthz")


@pytest.fixture
def client(api_url: str, api_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=api_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=60
    ) as http:
        yield http


def queued_runs(
    sessions: sessionmaker[Session],
    tenant_id: uuid.UUID,
    prompts: list[str],
    *,
    model: str,
    max_tokens: int = 8,
    ignore_eos: bool = False,
    priority: Priority = Priority.BATCH,
    deadline: datetime | None = None,
    **columns: Any,
) -> list[RunMessage]:
    """Committed ``complete`` requests on ``model`` and the messages published for them
    (``tasks.rows.run_message``, the mapping the API and the reconciler use)."""
    params = {"max_tokens": max_tokens, **({"ignore_eos": True} if ignore_eos else {})}
    with sessions.begin() as session:
        rows = [
            Request(
                tenant_id=tenant_id,
                task=TaskKind.COMPLETE,
                status=RequestStatus.QUEUED,
                priority=priority,
                model=model,
                input={"prompt": prompt},
                params=params,
                deadline_at=deadline,
                **columns,
            )
            for prompt in prompts
        ]
        session.add_all(rows)
        session.flush()
        return [run_message(row) for row in rows]


def publish_bundled(
    celery: Celery, config: RouterConfig, messages: list[RunMessage], *, bundle: int
) -> None:
    """Publish as the API does (``tasks.app.publish_runs``), ``bundle`` requests a broker
    message whatever the config's ``max_batch_size``."""
    models = {
        name: spec.model_copy(update={"max_batch_size": bundle})
        for name, spec in config.models.items()
    }
    publish_runs(celery, config.model_copy(update={"models": models}), messages)


@pytest.fixture
def make_runtime(sessions: sessionmaker[Session]) -> Iterator[Callable[..., WorkerRuntime]]:
    """Start in-process worker runtimes on the session's database, stopped after the test:
    ``make_runtime(engine, config=..., model=..., **WorkerRuntime options)``. Webhook
    deliveries are dropped unless ``publish_deliveries`` is given."""
    started: list[WorkerRuntime] = []

    def make(
        engine: Engine,
        *,
        config: RouterConfig,
        model: str,
        worker_name: str = "test-worker",
        publish_deliveries: Callable[[list[uuid.UUID]], None] = lambda ids: None,
        **options: Any,
    ) -> WorkerRuntime:
        runtime = WorkerRuntime(
            engine,
            model=model,
            config=config,
            sessions=sessions,
            worker_name=worker_name,
            publish_deliveries=publish_deliveries,
            **options,
        )
        runtime.start()
        started.append(runtime)
        return runtime

    yield make
    for runtime in reversed(started):
        runtime.stop()
