"""How long an evaluation run takes over a pool of N items, and what it scores.

    python -m bench.eval_bench [--items 500]

Against a throwaway Postgres database and Redis (keys under a prefix of their own): trains
(or reuses) the quick trained and degraded tiny models, fills the extract pool with N
generated products and their correct attributes, starts one `inferq worker` per model, then
times `run_eval` for the trained model (marked baseline) and the degraded one, each from the
first submit to the stored run. Prints both runs and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

from bench.stack import database, service_env, stop
from core.enums import TaskKind
from core.settings import Settings
from inferq.training.train import (
    DEGRADED_NAME,
    QUICK,
    SCHEMA_PATH,
    TRAINED_NAME,
    ensure_trained,
    held_out_products,
    products,
)
from quality.pool import add_known
from quality.runs import RunOutcome, run_eval
from quality.spec import EvalSpec
from storage.tables import Tenant

START_TIMEOUT_S = 300


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--models", type=Path, default=Path(".cache/models/eval"))
    args = parser.parse_args()
    admin = os.environ.get("INFERQ_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    broker = os.environ.get("INFERQ_BENCH_BROKER_URL", "redis://127.0.0.1:6379/12")
    paths = ensure_trained(args.models, QUICK, log=None)
    logs = Path(tempfile.mkdtemp(prefix="inferq-eval-bench-"))
    config = logs / "config.yaml"
    spec = {"engine": "vllm", "max_model_len": 512, "max_batch_size": 64, "batch_window_ms": 50}
    models = {
        name: {**spec, "path": str(path.resolve()), "options": {"dtype": "float32"}}
        for name, path in zip((TRAINED_NAME, DEGRADED_NAME), paths, strict=True)
    }
    config.write_text(
        yaml.safe_dump({"models": models, "routes": [{"task": "*", "model": TRAINED_NAME}]})
    )
    with database(admin) as database_url:
        settings = Settings(
            database_url=database_url,
            broker_url=broker,
            config=config,
            broker_key_prefix=f"inferq-eval-bench-{uuid.uuid4().hex[:8]}:",
            reconciler=False,
        )
        outcomes = _measure(settings, args.items, logs)
    figures = {
        name: {
            "seconds": round(o.seconds, 1),
            "items_per_s": round(o.run.n / o.seconds, 1),
            "value": round((o.run.scores or {})["value"], 3),
            "ci": [round(o.run.ci_low or 0, 3), round(o.run.ci_high or 0, 3)],
            "regression": bool(o.comparison and o.comparison.regression),
        }
        for name, o in outcomes.items()
    }
    print(json.dumps({"items": args.items, **figures}))


def _measure(settings: Settings, items: int, logs: Path) -> dict[str, RunOutcome]:
    from submission.services import build_services

    services = build_services(settings)
    workers = _start_workers(settings, logs)
    try:
        schema = json.loads(SCHEMA_PATH.read_text())
        held_out = {item["text"] for item in held_out_products()}
        known = [
            ({"text": p["text"], "schema": schema}, p["attributes"])
            for p in products(2026, items, exclude=held_out)
        ]
        with services.sessions.begin() as session:
            tenant = Tenant(name="bench-pool")
            session.add(tenant)
            session.flush()
            add_known(session, tenant.id, TaskKind.EXTRACT, known)
        outcomes = {}
        for name, baseline in ((TRAINED_NAME, True), (DEGRADED_NAME, False)):
            spec = EvalSpec(candidate=name, task=TaskKind.EXTRACT, baseline=baseline)
            outcome = run_eval(services, spec, threshold=settings.eval_threshold)
            assert outcome.comparison is not None, outcome.run.error
            print(f"{outcome.seconds:.1f}s for {items} items:")
            for line in outcome.comparison.lines():
                print(line)
            outcomes[name] = outcome
        return outcomes
    finally:
        stop(workers)
        services.dispose()


def _start_workers(settings: Settings, logs: Path) -> list[subprocess.Popen[bytes]]:
    env = service_env(settings)
    started = []
    for name in (TRAINED_NAME, DEGRADED_NAME):
        log = logs / f"{name}.log"
        command = [sys.executable, "-m", "inferq.cli", "worker", "--model", name]
        started.append(
            (
                log,
                subprocess.Popen(command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT),
            )
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not all("ready." in log.read_text(errors="replace") for log, _ in started):
        if time.monotonic() > deadline or any(p.poll() is not None for _, p in started):
            raise SystemExit(f"eval bench: a worker did not start; logs in {logs}")
        time.sleep(0.5)
    return [process for _, process in started]


if __name__ == "__main__":
    main()
