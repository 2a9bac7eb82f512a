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

import httpx
import psycopg
import pytest
import redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from inferq.enums import Priority, RequestStatus, TaskKind
from inferq.settings import Settings
from storage.db import make_engine, make_sessionmaker
from storage.migrate import scratch_database
from storage.models import Request
from storage.tenants import create_tenant
from tasks.contract import EngineRequest, RunMessage

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
def db_engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings.database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def sessions(db_engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(db_engine)


@pytest.fixture
def api_key(sessions: sessionmaker[Session]) -> str:
    """A fresh tenant per test: tests never see each other's requests."""
    with sessions.begin() as session:
        _tenant, key = create_tenant(session, f"tenant-{uuid.uuid4().hex[:8]}")
    return key


@pytest.fixture
def tenant_id(sessions: sessionmaker[Session]) -> uuid.UUID:
    """A fresh tenant for tests that write rows themselves."""
    with sessions.begin() as session:
        tenant, _key = create_tenant(session, f"tenant-{uuid.uuid4().hex[:8]}")
        return tenant.id


def service_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        INFERQ_DATABASE_URL=settings.database_url,
        INFERQ_BROKER_URL=settings.broker_url,
        INFERQ_CONFIG=str(settings.config),
        INFERQ_CACHE_DIR=str(settings.cache_dir),
        INFERQ_MODELS_DIR=str(settings.model_cache),
        INFERQ_BROKER_KEY_PREFIX=settings.broker_key_prefix,
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
    from inferq.tiny_model import ensure_tiny_model

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


def message_for(row: Request, *, max_tokens: int = 8) -> RunMessage:
    """The message the API would publish for a committed ``complete`` request row."""
    return RunMessage(
        request_id=str(row.id),
        tenant_id=str(row.tenant_id),
        model=row.model,
        task=TaskKind.COMPLETE,
        priority=Priority.BATCH,
        engine_request=EngineRequest(prompt=row.input["prompt"], max_tokens=max_tokens),
        enqueued_at=time.time(),
        fallbacks=row.fallbacks,
    )


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
) -> list[RunMessage]:
    """Committed ``complete`` requests on ``model`` and the messages the API would publish."""
    messages = []
    with sessions.begin() as session:
        for prompt in prompts:
            row = Request(
                tenant_id=tenant_id,
                task=TaskKind.COMPLETE,
                status=RequestStatus.QUEUED,
                priority=priority,
                model=model,
                input={"prompt": prompt},
                params={},
                deadline_at=deadline,
            )
            session.add(row)
            session.flush()
            request = EngineRequest(prompt=prompt, max_tokens=max_tokens, ignore_eos=ignore_eos)
            messages.append(
                RunMessage(
                    request_id=str(row.id),
                    tenant_id=str(tenant_id),
                    model=model,
                    task=TaskKind.COMPLETE,
                    priority=priority,
                    engine_request=request,
                    enqueued_at=time.time(),
                )
            )
    return messages
