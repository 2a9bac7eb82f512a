"""Service mode against the bare engine, side by side in one run.

Each round sends N requests through API → Redis → one worker → Postgres (timed from the first
submit to the last result stored), then runs the same prompts straight through the engine in
one call at the same maximum batch size. Rounds alternate so both see the same machine; the
figures are the medians over rounds. The last line printed is one JSON object.

    python -m bench.throughput [--requests 1000] [--max-tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psycopg
import redis
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from inferq.enums import TaskKind
from inferq.models import resolve_model_path
from inferq.settings import Settings
from router import load_config
from storage.db import make_engine, make_sessionmaker, normalise_url
from storage.migrate import upgrade
from storage.models import LedgerEntry, Request, as_utc
from storage.reports import percentile
from storage.tenants import create_tenant
from tasks.templates import SamplingIn, render
from workers.engines import Engine, create_engine

CONFIG = Path(__file__).parent / "config.yaml"
# About 58 prompt tokens with the chat template on the tiny model's tokenizer.
PROMPT = (
    "Write a short product title for this item: a lightweight waterproof hiking jacket in "
    "forest green with taped seams, two zipped hand pockets, an adjustable hood and a "
    "recycled polyester shell, size medium."
)
START_TIMEOUT_S = 300


@dataclass(frozen=True, slots=True)
class Stack:
    url: str
    key: str
    sessions: sessionmaker[Session]
    processes: list[subprocess.Popen[bytes]]
    logs: Path


def main() -> None:
    args = _parse()
    admin = os.environ.get("INFERQ_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    broker = os.environ.get("INFERQ_BENCH_BROKER_URL", "redis://127.0.0.1:6379/12")
    body = {
        "task": "chat",
        "input": {"messages": [{"role": "user", "content": PROMPT}]},
        "params": {"max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0},
        "priority": "batch",
    }
    rounds = []
    with _database(admin) as database_url:
        settings = Settings(database_url=database_url, broker_url=broker, config=CONFIG)
        with _stack(settings) as stack, _direct_engine(settings) as engine:
            for number in range(1, args.rounds + 1):
                service = _service_round(stack, body, args.requests, args.concurrency)
                direct = _direct_round(engine, body, args.requests)
                service["direct_rps"] = direct
                service["ratio"] = service["service_rps"] / direct
                rounds.append(service)
                print(f"round {number}: " + ", ".join(f"{k} {v:.3g}" for k, v in service.items()))
    figures: dict[str, Any] = {
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "max_batch_size": load_config(CONFIG).models["tiny"].max_batch_size,
        "rounds": args.rounds,
    }
    for name in rounds[0]:
        figures[name] = round(statistics.median(r[name] for r in rounds), 3)
    print(
        f"service mode: {figures['service_rps']} requests/s (p50 {figures['p50_latency_s']}s, "
        f"p95 {figures['p95_latency_s']}s, mean batch {figures['mean_batch_size']})"
    )
    print(f"direct engine: {figures['direct_rps']} requests/s")
    print(f"ratio service/direct (median of {args.rounds} rounds): {figures['ratio']}")
    print(json.dumps(figures))


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32, help="Client connections.")
    return parser.parse_args()


@contextmanager
def _database(admin_url: str) -> Iterator[str]:
    """A throwaway Postgres database for one run."""
    admin = make_url(normalise_url(admin_url))
    name = f"inferq_bench_{uuid.uuid4().hex[:10]}"
    conninfo = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = admin.set(database=name).render_as_string(hide_password=False)
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def _stack(settings: Settings) -> Iterator[Stack]:
    """`inferq worker` and `inferq api` as processes, warm, against a fresh Redis db."""
    redis.Redis.from_url(settings.broker_url).flushdb()
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as session:
        _tenant, key = create_tenant(session, "bench")
    env = dict(os.environ)
    env.update(
        INFERQ_DATABASE_URL=settings.database_url,
        INFERQ_BROKER_URL=settings.broker_url,
        INFERQ_CONFIG=str(settings.config),
    )
    logs = Path(tempfile.mkdtemp(prefix="inferq-bench-"))
    port = 8765
    cli = [sys.executable, "-m", "inferq.cli", "--log-level", "WARNING"]
    commands = {
        "worker": [*cli, "worker", "--model", "tiny", "--loglevel", "WARNING"],
        "api": [*cli, "api", "--port", str(port)],
    }
    processes = [
        subprocess.Popen(
            command, env=env, stdout=(logs / f"{name}.log").open("wb"), stderr=subprocess.STDOUT
        )
        for name, command in commands.items()
    ]
    stack = Stack(f"http://127.0.0.1:{port}", key, sessions, processes, logs)
    try:
        _wait_ready(stack)
        yield stack
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=60)
        engine.dispose()
        redis.Redis.from_url(settings.broker_url).flushdb()


def _wait_ready(stack: Stack) -> None:
    """The API answers and the worker has run one request (engine loaded and warm)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    headers = {"Authorization": f"Bearer {stack.key}"}
    while not _healthy(stack.url):
        _check_alive(stack)
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: the API did not start; logs in {stack.logs}")
        time.sleep(0.5)
    warm = {"task": "complete", "input": {"prompt": "warm up"}, "params": {"max_tokens": 4}}
    request_id = httpx.post(f"{stack.url}/v1/requests", json=warm, headers=headers).json()["id"]
    while time.monotonic() < deadline:
        _check_alive(stack)
        answer = httpx.get(
            f"{stack.url}/v1/requests/{request_id}",
            params={"wait": 10},
            headers=headers,
            timeout=30,
        ).json()
        if answer["status"] == "succeeded":
            return
    raise SystemExit(f"bench: the worker did not answer; logs in {stack.logs}")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _service_round(
    stack: Stack, body: dict[str, Any], n: int, concurrency: int
) -> dict[str, float]:
    started = time.time()
    ids, submit_s = asyncio.run(_submit_all(stack, body, n, concurrency))
    _wait_done(stack, ids)
    with stack.sessions() as session:
        rows = session.execute(
            select(Request.created_at, Request.finished_at).where(Request.id.in_(ids))
        ).all()
        mean_batch = session.scalar(
            select(func.avg(LedgerEntry.batch_size)).where(LedgerEntry.request_id.in_(ids))
        )
    last = max(as_utc(r.finished_at).timestamp() for r in rows)
    latencies = sorted((as_utc(r.finished_at) - as_utc(r.created_at)).total_seconds() for r in rows)
    return {
        "service_rps": n / (last - started),
        "p50_latency_s": percentile(latencies, 50),
        "p95_latency_s": percentile(latencies, 95),
        "mean_batch_size": float(mean_batch or 0),
        "submit_s": submit_s,
    }


async def _submit_all(
    stack: Stack, body: dict[str, Any], n: int, concurrency: int
) -> tuple[list[uuid.UUID], float]:
    """Submit with a light client (aiohttp), so the client takes little of the machine."""
    ids: list[uuid.UUID] = []
    pending = iter(range(n))
    headers = {"Authorization": f"Bearer {stack.key}"}
    clock = time.perf_counter()
    async with aiohttp.ClientSession(stack.url, headers=headers) as client:

        async def sender() -> None:
            for _ in pending:
                async with client.post("/v1/requests", json=body) as response:
                    response.raise_for_status()
                    ids.append(uuid.UUID((await response.json())["id"]))

        await asyncio.gather(*(sender() for _ in range(concurrency)))
    return ids, time.perf_counter() - clock


def _wait_done(stack: Stack, ids: list[uuid.UUID]) -> None:
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        _check_alive(stack)
        with stack.sessions() as session:
            done = session.scalar(
                select(func.count()).where(Request.id.in_(ids), Request.finished_at.is_not(None))
            )
        if done == len(ids):
            return
        time.sleep(0.05)
    raise SystemExit("bench: requests did not finish within 30 minutes")


def _check_alive(stack: Stack) -> None:
    if any(process.poll() is not None for process in stack.processes):
        raise SystemExit(f"bench: a service exited; logs in {stack.logs}")


@contextmanager
def _direct_engine(settings: Settings) -> Iterator[Engine]:
    spec = load_config(settings.config).models["tiny"]
    engine = create_engine(spec, model_path=resolve_model_path(spec.path, settings))
    try:
        yield engine
    finally:
        engine.close()


def _direct_round(engine: Engine, body: dict[str, Any], n: int) -> float:
    """The same prompts, one engine call, the same maximum batch size: the engine's limit."""
    request = render(TaskKind.CHAT, body["input"], SamplingIn(**body["params"]))
    engine.generate([request] * 8)  # warm, as the worker is
    clock = time.perf_counter()
    outputs = engine.generate([request] * n)
    elapsed = time.perf_counter() - clock
    assert all(o.completion_tokens == request.max_tokens for o in outputs)
    return n / elapsed


if __name__ == "__main__":
    main()
