"""Service mode against the bare engine, side by side in one run.

Sends N requests through API → Redis → one worker → Postgres (timed from the first submit to
the last result stored), then runs the same prompts straight through the engine in one call at
the same maximum batch size. Prints both throughputs, their ratio and latency percentiles; the
last line is one JSON object with those figures.

    python -m bench.throughput [--requests 1000] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

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
from workers.engines import create_engine

HERE = Path(__file__).parent
CONFIG = HERE / "config.yaml"
# About 58 prompt tokens with the chat template on the tiny model's tokenizer.
PROMPT = (
    "Write a short product title for this item: a lightweight waterproof hiking jacket in "
    "forest green with taped seams, two zipped hand pockets, an adjustable hood and a "
    "recycled polyester shell, size medium."
)


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
    with _database(admin) as database_url:
        settings = Settings(database_url=database_url, broker_url=broker, config=CONFIG)
        service = _service_run(settings, body, args.requests, args.concurrency)
    direct = _direct_run(settings, body, args.requests)
    figures = {
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "max_batch_size": load_config(CONFIG).models["tiny"].max_batch_size,
        "service_rps": round(service["rps"], 2),
        "direct_rps": round(direct, 2),
        "ratio": round(service["rps"] / direct, 3),
        "p50_latency_s": round(service["p50"], 3),
        "p95_latency_s": round(service["p95"], 3),
        "mean_batch_size": round(service["mean_batch"], 1),
        "submit_s": round(service["submit_s"], 2),
    }
    print(
        f"service mode: {figures['service_rps']} requests/s "
        f"(p50 {figures['p50_latency_s']}s, p95 {figures['p95_latency_s']}s, "
        f"mean batch {figures['mean_batch_size']})"
    )
    print(f"direct engine: {figures['direct_rps']} requests/s")
    print(f"ratio service/direct: {figures['ratio']}")
    print(json.dumps(figures))


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32, help="Client connections.")
    return parser.parse_args()


class _database:
    """A throwaway Postgres database for one run."""

    def __init__(self, admin_url: str) -> None:
        self.admin = make_url(normalise_url(admin_url))
        self.name = f"inferq_bench_{uuid.uuid4().hex[:10]}"
        self.conninfo = self.admin.set(drivername="postgresql").render_as_string(False)

    def __enter__(self) -> str:
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        url = self.admin.set(database=self.name).render_as_string(hide_password=False)
        upgrade(url)
        return url

    def __exit__(self, *exc: object) -> None:
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def _service_run(
    settings: Settings, body: dict[str, Any], n: int, concurrency: int
) -> dict[str, float]:
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
    procs = [
        subprocess.Popen(
            [*cli, "worker", "--model", "tiny", "--loglevel", "WARNING"],
            env=env,
            stdout=(logs / "worker.log").open("wb"),
            stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            [*cli, "api", "--port", str(port)],
            env=env,
            stdout=(logs / "api.log").open("wb"),
            stderr=subprocess.STDOUT,
        ),
    ]
    try:
        url = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {key}"}
        _wait_ready(url, headers, procs, logs)
        started = time.time()
        ids, submit_s = asyncio.run(_submit_all(url, headers, body, n, concurrency))
        _wait_done(sessions, ids, procs, logs)
        with sessions() as session:
            rows = session.execute(
                select(Request.created_at, Request.finished_at).where(Request.id.in_(ids))
            ).all()
            mean_batch = session.scalar(
                select(func.avg(LedgerEntry.batch_size)).where(LedgerEntry.request_id.in_(ids))
            )
        last = max(as_utc(r.finished_at).timestamp() for r in rows)
        latencies = sorted(
            (as_utc(r.finished_at) - as_utc(r.created_at)).total_seconds() for r in rows
        )
        return {
            "rps": n / (last - started),
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "mean_batch": float(mean_batch or 0),
            "submit_s": submit_s,
        }
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)
        engine.dispose()


def _wait_ready(
    url: str, headers: dict[str, str], procs: list[subprocess.Popen[bytes]], logs: Path
) -> None:
    """The API answers and the worker has run one request (engine loaded and warm)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        _check_alive(procs, logs)
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    warm = {"task": "complete", "input": {"prompt": "warm up"}, "params": {"max_tokens": 4}}
    request_id = httpx.post(f"{url}/v1/requests", json=warm, headers=headers).json()["id"]
    while time.monotonic() < deadline:
        _check_alive(procs, logs)
        answer = httpx.get(
            f"{url}/v1/requests/{request_id}", params={"wait": 10}, headers=headers, timeout=30
        ).json()
        if answer["status"] == "succeeded":
            return
    raise SystemExit("bench: services did not become ready within 300 s")


async def _submit_all(
    url: str, headers: dict[str, str], body: dict[str, Any], n: int, concurrency: int
) -> tuple[list[uuid.UUID], float]:
    ids: list[uuid.UUID] = []
    pending = iter(range(n))
    clock = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:

        async def sender() -> None:
            for _ in pending:
                response = await client.post("/v1/requests", json=body)
                response.raise_for_status()
                ids.append(uuid.UUID(response.json()["id"]))

        await asyncio.gather(*(sender() for _ in range(concurrency)))
    return ids, time.perf_counter() - clock


def _wait_done(
    sessions: Any, ids: list[uuid.UUID], procs: list[subprocess.Popen[bytes]], logs: Path
) -> None:
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        _check_alive(procs, logs)
        with sessions() as session:
            done = session.scalar(
                select(func.count()).where(Request.id.in_(ids), Request.finished_at.is_not(None))
            )
        if done == len(ids):
            return
        time.sleep(0.05)
    raise SystemExit("bench: requests did not finish within 30 minutes")


def _check_alive(procs: list[subprocess.Popen[bytes]], logs: Path) -> None:
    for proc in procs:
        if proc.poll() is not None:
            raise SystemExit(f"bench: a service exited; see the logs in {logs}")


def _direct_run(settings: Settings, body: dict[str, Any], n: int) -> float:
    """The same prompts, one engine call, the same maximum batch size: the engine's limit."""
    config = load_config(settings.config)
    spec = config.models["tiny"]
    engine = create_engine(spec, model_path=resolve_model_path(spec.path, settings))
    request = render(TaskKind.CHAT, body["input"], SamplingIn(**body["params"]))
    try:
        engine.generate([request] * 8)  # warm-up, as the service run had
        clock = time.perf_counter()
        outputs = engine.generate([request] * n)
        elapsed = time.perf_counter() - clock
    finally:
        engine.close()
    assert all(o.completion_tokens == request.max_tokens for o in outputs)
    return n / elapsed


if __name__ == "__main__":
    main()
