"""Bulk jobs: time to accept a large file, time to its first result, and bulk throughput
against the same prompts straight through the engine.

    python -m bench.bulk [--lines 100000] [--throughput-lines 2000]

Accepting means the upload's HTTP call returned 202. A file over ``inline_job_lines`` (2,000)
is stored whole and answered ``validating``; its lines are then checked, committed and published
in the background, a small first chunk first (api/admission.py), so the first result follows
within about a second. The big job is cancelled once its first result is in; the throughput
job (2,000 lines, checked inline) runs to the end, timed from the upload to the last result
stored. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import httpx
from sqlalchemy import func, select

from bench.throughput import CONFIG, PROMPT, Stack, _database, _direct_engine, _stack
from inferq.enums import TaskKind
from inferq.settings import Settings
from storage.models import Request, as_utc
from tasks.templates import SamplingIn, render

PARAMS = {"max_tokens": 32, "ignore_eos": True, "temperature": 0}


def main() -> None:
    args = _parse()
    admin = os.environ.get("INFERQ_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    broker = os.environ.get("INFERQ_BENCH_BROKER_URL", "redis://127.0.0.1:6379/12")
    with _database(admin) as database_url:
        settings = Settings(database_url=database_url, broker_url=broker, config=CONFIG)
        with (
            _stack(settings) as stack,
            httpx.Client(
                base_url=stack.url, headers={"Authorization": f"Bearer {stack.key}"}, timeout=3600
            ) as client,
        ):
            # Throughput first: the big job's cancelled remainder would sit ahead of it.
            service_rps = _throughput(client, stack, args.throughput_lines)
            accept_s, first_s = _accept_and_first(client, args.lines)
        with _direct_engine(settings) as engine:
            request = render(
                TaskKind.CHAT,
                {"messages": [{"role": "user", "content": PROMPT}]},
                SamplingIn(**PARAMS),
            )
            engine.generate([request] * 8)
            clock = time.perf_counter()
            engine.generate([request] * args.throughput_lines)
            direct_rps = args.throughput_lines / (time.perf_counter() - clock)
    figures = {
        "lines": args.lines,
        "accept_s": round(accept_s, 2),
        "accept_lines_per_s": round(args.lines / accept_s, 1),
        "first_result_after_accept_s": round(first_s, 3),
        "throughput_lines": args.throughput_lines,
        "bulk_rps": round(service_rps, 2),
        "direct_rps": round(direct_rps, 2),
        "ratio": round(service_rps / direct_rps, 3),
    }
    print(f"accepted {args.lines} lines in {accept_s:.1f}s; first result {first_s:.2f}s later")
    print(f"bulk {service_rps:.1f} requests/s vs direct {direct_rps:.1f}: ratio {figures['ratio']}")
    print(json.dumps(figures))


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--throughput-lines", type=int, default=2000)
    return parser.parse_args()


def _jsonl(n: int) -> bytes:
    line = {"messages": [{"role": "user", "content": PROMPT}]}
    return b"\n".join(json.dumps({"id": f"item-{i}", "input": line}).encode() for i in range(n))


def _upload(client: httpx.Client, n: int) -> tuple[dict[str, Any], float]:
    spec = {"task": "chat", "params": PARAMS}
    files = {"file": ("items.jsonl", _jsonl(n), "application/x-ndjson")}
    clock = time.perf_counter()
    response = client.post("/v1/jobs", data={"job": json.dumps(spec)}, files=files)
    elapsed = time.perf_counter() - clock
    response.raise_for_status()
    return response.json(), elapsed


def _accept_and_first(client: httpx.Client, n: int) -> tuple[float, float]:
    job, accept_s = _upload(client, n)
    accepted = time.perf_counter()
    while client.get(f"/v1/jobs/{job['id']}").json()["counts"]["succeeded"] == 0:
        if time.perf_counter() - accepted > 600:
            raise SystemExit("bench: no result within 10 minutes of acceptance")
        time.sleep(0.01)
    first_s = time.perf_counter() - accepted
    client.post(f"/v1/jobs/{job['id']}/cancel").raise_for_status()
    _drain(client, job["id"])
    return accept_s, first_s


def _drain(client: httpx.Client, job_id: str) -> None:
    while client.get(f"/v1/jobs/{job_id}").json()["status"] not in ("cancelled", "completed"):
        time.sleep(0.2)


def _throughput(client: httpx.Client, stack: Stack, n: int) -> float:
    started = time.time()
    job, _accept_s = _upload(client, n)
    _drain(client, job["id"])
    with stack.sessions() as session:
        last = session.scalar(
            select(func.max(Request.finished_at)).where(Request.job_id == job["id"])
        )
    return n / (as_utc(last).timestamp() - started)


if __name__ == "__main__":
    main()
