"""The service under test, as the benchmarks start it, and what its stored results say.

`inferq api` and one `inferq worker --model tiny` run as processes against a throwaway
Postgres database and a flushed Redis db (``INFERQ_BENCH_DATABASE_URL``,
``INFERQ_BENCH_BROKER_URL``), warm before anything is timed. Results are read from the
requests table: only a request that succeeded with its expected completion tokens counts,
and a run ends at the last stored ``finished_at``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import redis
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session, sessionmaker

from bench.workload import Item, jsonl
from core.enums import RequestStatus
from core.settings import Settings
from router import load_config
from router.config import ModelSpec
from storage.db import make_engine, make_sessionmaker
from storage.migrate import scratch_database
from storage.tables import LedgerEntry, Request, as_utc
from storage.tenants import create_tenant

CONFIG = Path(__file__).parent / "config.yaml"
MODEL = "tiny"
PORT = 8765
START_TIMEOUT_S = 300
RUN_TIMEOUT_S = 1800


@dataclass(frozen=True, slots=True)
class Stack:
    url: str
    key: str
    settings: Settings
    sessions: sessionmaker[Session]
    processes: list[subprocess.Popen[bytes]]
    logs: Path

    @property
    def spec(self) -> ModelSpec:
        return load_config(self.settings.config).models[MODEL]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def check_alive(self) -> None:
        if any(process.poll() is not None for process in self.processes):
            raise SystemExit(f"bench: a service exited; logs in {self.logs}")


@dataclass(frozen=True, slots=True)
class Outcome:
    """Stored results of one run, as the requests table holds them."""

    ok: int  # succeeded with exactly the expected completion tokens
    total: int
    completion_tokens: int  # of the ok requests
    last_finished: float  # Unix time of the last stored finished_at
    latencies: list[float]  # created_at → finished_at of the ok requests, sorted
    mean_batch_size: float


@contextmanager
def service() -> Iterator[Stack]:
    """A fresh database, the API and one worker, warm; everything removed afterwards."""
    admin = os.environ.get("INFERQ_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    broker = os.environ.get("INFERQ_BENCH_BROKER_URL", "redis://127.0.0.1:6379/12")
    with database(admin) as database_url:
        settings = Settings(database_url=database_url, broker_url=broker, config=CONFIG)
        with _processes(settings) as stack:
            yield stack


def submit_all(stack: Stack, bodies: Sequence[dict[str, Any]], concurrency: int) -> list[uuid.UUID]:
    """``POST /v1/requests`` each body, in order, ids in the same order."""
    return asyncio.run(_submit_all(stack, bodies, concurrency))


def wait_finished(stack: Stack, condition: ColumnElement[bool], total: int) -> float:
    """Wait until ``total`` matching requests are finished; returns when that was seen."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        stack.check_alive()
        with stack.sessions() as session:
            done = session.scalar(
                select(func.count()).where(condition, Request.finished_at.is_not(None))
            )
        if done == total:
            return time.time()
        time.sleep(0.05)
    raise SystemExit(f"bench: requests did not finish within {RUN_TIMEOUT_S} s")


def outcome(
    stack: Stack, condition: ColumnElement[bool], expected: Callable[[uuid.UUID], int]
) -> Outcome:
    """Count the matching requests that succeeded with ``expected(id)`` completion tokens."""
    with stack.sessions() as session:
        rows = session.execute(
            select(
                Request.id,
                Request.status,
                Request.completion_tokens,
                Request.created_at,
                Request.finished_at,
            ).where(condition)
        ).all()
        ids = [r.id for r in rows]
        mean_batch = session.scalar(
            select(func.avg(LedgerEntry.batch_size)).where(LedgerEntry.request_id.in_(ids))
        )
    good = [
        r
        for r in rows
        if r.status == RequestStatus.SUCCEEDED and r.completion_tokens == expected(r.id)
    ]
    return Outcome(
        ok=len(good),
        total=len(rows),
        completion_tokens=sum(r.completion_tokens for r in good),
        last_finished=max(as_utc(r.finished_at).timestamp() for r in rows if r.finished_at),
        latencies=sorted(
            (as_utc(r.finished_at) - as_utc(r.created_at)).total_seconds() for r in good
        ),
        mean_batch_size=float(mean_batch or 0),
    )


def upload_job(client: httpx.Client, items: Sequence[Item]) -> tuple[uuid.UUID, float]:
    """``POST /v1/jobs`` with the items as JSONL (one shared ``max_tokens``): the job's id and
    how long the upload took to be answered."""
    assert len({item.max_tokens for item in items}) == 1, "a job shares its parameters"
    spec = {"task": "chat", "params": items[0].params}
    files = {"file": ("items.jsonl", jsonl(items), "application/x-ndjson")}
    clock = time.perf_counter()
    response = client.post("/v1/jobs", data={"job": json.dumps(spec)}, files=files)
    elapsed = time.perf_counter() - clock
    response.raise_for_status()
    return uuid.UUID(response.json()["id"]), elapsed


def wait_job(client: httpx.Client, job_id: uuid.UUID) -> None:
    """Until the job is completed or cancelled (every request settled)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while client.get(f"/v1/jobs/{job_id}").json()["status"] not in ("cancelled", "completed"):
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: job {job_id} did not settle within {RUN_TIMEOUT_S} s")
        time.sleep(0.2)


def service_env(settings: Settings) -> dict[str, str]:
    """This environment, with the settings an `inferq` process reads."""
    return {
        **os.environ,
        "INFERQ_DATABASE_URL": settings.database_url,
        "INFERQ_BROKER_URL": settings.broker_url,
        "INFERQ_CONFIG": str(settings.config),
        "INFERQ_BROKER_KEY_PREFIX": settings.broker_key_prefix,
    }


def stop(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(timeout=60)


@contextmanager
def database(admin_url: str) -> Iterator[str]:
    """A throwaway Postgres database for one run."""
    with scratch_database(admin_url, "inferq_bench") as url:
        yield url


@contextmanager
def _processes(settings: Settings) -> Iterator[Stack]:
    """`inferq worker` and `inferq api` as processes, warm, against a fresh Redis db."""
    redis.Redis.from_url(settings.broker_url).flushdb()
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as session:
        _tenant, key = create_tenant(session, "bench")
    env = service_env(settings)
    logs = Path(tempfile.mkdtemp(prefix="inferq-bench-"))
    cli = [sys.executable, "-m", "inferq.cli", "--log-level", "WARNING"]
    commands = {
        "worker": [*cli, "worker", "--model", MODEL, "--loglevel", "WARNING"],
        "api": [*cli, "api", "--port", str(PORT)],
    }
    processes = [
        subprocess.Popen(
            command, env=env, stdout=(logs / f"{name}.log").open("wb"), stderr=subprocess.STDOUT
        )
        for name, command in commands.items()
    ]
    stack = Stack(f"http://127.0.0.1:{PORT}", key, settings, sessions, processes, logs)
    try:
        _wait_ready(stack)
        yield stack
    finally:
        stop(processes)
        engine.dispose()
        redis.Redis.from_url(settings.broker_url).flushdb()


def _wait_ready(stack: Stack) -> None:
    """The API answers and the worker has run one request (engine loaded and warm)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _healthy(stack.url):
        stack.check_alive()
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: the API did not start; logs in {stack.logs}")
        time.sleep(0.5)
    warm = {"task": "complete", "input": {"prompt": "warm up"}, "params": {"max_tokens": 4}}
    url = f"{stack.url}/v1/requests"
    request_id = httpx.post(url, json=warm, headers=stack.headers).json()["id"]
    while time.monotonic() < deadline:
        stack.check_alive()
        answer = httpx.get(
            f"{url}/{request_id}", params={"wait": 10}, headers=stack.headers, timeout=30
        ).json()
        if answer["status"] == "succeeded":
            return
        if answer["status"] not in ("queued", "running"):
            raise SystemExit(f"bench: the warm-up request {answer['status']}: {answer['error']}")
    raise SystemExit(f"bench: the worker did not answer; logs in {stack.logs}")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


async def _submit_all(
    stack: Stack, bodies: Sequence[dict[str, Any]], concurrency: int
) -> list[uuid.UUID]:
    """Submit with a light client (aiohttp), so the client takes little of the machine."""
    ids: list[uuid.UUID | None] = [None] * len(bodies)
    pending = iter(enumerate(bodies))
    async with aiohttp.ClientSession(stack.url, headers=stack.headers) as client:

        async def sender() -> None:
            for index, body in pending:
                async with client.post("/v1/requests", json=body) as response:
                    response.raise_for_status()
                    ids[index] = uuid.UUID((await response.json())["id"])

        await asyncio.gather(*(sender() for _ in range(concurrency)))
    return [i for i in ids if i is not None]
