"""The pipeline's own cost: bulk jobs through the service with an engine that costs nothing.

    python -m bench.pipeline [--workers 1,2] [--lines 20000] [--rounds 3] [--profile]
    python -m bench.pipeline --simulate-gpu [--workers 1,2,4,8,16] [--lines-per-worker 512]

The bulk path as users run it: ``POST /v1/jobs`` (admission in the API), publish, consume,
claim, run, commit with ledger rows, acknowledge; `inferq api` and N `inferq worker`
processes against real Postgres (a throwaway database) and Redis (db 13 by default,
``INFERQ_BENCH_BROKER_URL``). The engine is the scripted one: it answers at once, or with
``--simulate-gpu`` each batch sleeps as long as an H100 took for that batch size
(``GPU_CURVE``, from shared/notes/vllm-cpu.md: transformers ``generate`` of 64 new tokens on a
1.1 B model), releasing the GIL as a GPU-bound engine does.

A run uploads one job (``--lines`` lines, or ``--lines-per-worker`` x N) and lasts from the
upload to the last stored ``finished_at``; only requests that succeeded with the expected
completion tokens count. Each worker count runs once a round, in reverse order every other
round, and the figures are medians over rounds. CPU seconds per request are split by process:
the API, each worker (its tree), the Postgres backends of the bench's database, the Postgres
server's shared processes, the Redis server (shared with anything else using it) and this
process. With ``--profile``, the API and the first worker are sampled by py-spy during each
run (``bench.profile``), and the report names the calls that hold each one's Python time. The
last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import redis
import yaml
from sqlalchemy import exists, func, select

from bench import workload
from bench.cpu import CpuMeter, Picker, Proc, command, tree
from bench.profile import Profiler
from bench.stack import RUN_TIMEOUT_S, Stack, database, outcome, service_env, stop, upload_job
from core.enums import OPEN_STATUSES, JobStatus
from core.settings import Settings
from router import load_config
from storage.db import make_engine, make_sessionmaker
from storage.tables import Job, LedgerEntry, Request, as_utc
from storage.tenants import create_tenant
from tasks.app import create_celery

MODEL = "tiny"
PORT = 8766
MAX_TOKENS = 8
START_TIMEOUT_S = 120
# Batch size → seconds per call: an H100, transformers generate, 128 prompt + 64 new tokens.
GPU_CURVE = [(1, 1.0), (4, 1.026), (16, 1.032), (64, 1.125), (256, 1.533)]

Figures = dict[str, float]


def main() -> None:
    args = _parse()
    counts = [int(n) for n in args.workers.split(",")]
    options: dict[str, object] = {"step_curve": GPU_CURVE} if args.simulate_gpu else {}
    rounds: dict[int, list[Figures]] = {n: [] for n in counts}
    profiles: dict[int, dict[str, dict[str, float]]] = {}  # the last round's, by count
    with _api(args.batch, options) as (stack, settings):
        with httpx.Client(base_url=stack.url, headers=stack.headers, timeout=600) as client:
            for number in range(1, args.rounds + 1):
                order = counts if number % 2 else counts[::-1]
                for n in order:
                    lines = args.lines_per_worker * n if args.simulate_gpu else args.lines
                    with _workers(stack, settings, n) as workers:
                        profiler = _profiler(workers) if args.profile else None
                        figures = _run(client, workers, lines, profiler)
                    rounds[n].append(figures)
                    print(_show(f"round {number}, {n} worker(s)", figures), flush=True)
                    if profiler is not None:
                        profiles[n] = profiler.shares
                        for name, shares in profiler.shares.items():
                            print(_show(f"  profile {name} (share of the run)", shares))
    report = _report(rounds, simulate=args.simulate_gpu)
    if profiles:
        report["profile"] = profiles
    for n, figures in _medians(rounds).items():
        print(_show(f"median, {n} worker(s)", figures))
    if "bends_at" in report:
        print(
            f"ratio to N x one worker: {report['ratio_to_linear']}; bends at {report['bends_at']}"
        )
        for reason in report.get("why", []):
            print(f"  {reason}")
    print(json.dumps({"lines": args.lines, "batch": args.batch, "rounds": args.rounds, **report}))


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--simulate-gpu", action="store_true")
    parser.add_argument("--workers", help="worker counts, comma-separated")
    parser.add_argument("--lines", type=int, default=20_000, help="lines a job (no GPU)")
    parser.add_argument("--lines-per-worker", type=int, default=512, help="with --simulate-gpu")
    parser.add_argument("--batch", type=int, default=64, help="the model's max_batch_size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--profile", action="store_true", help="sample the API and a worker with py-spy"
    )
    args = parser.parse_args()
    if args.workers is None:
        args.workers = "1,2,4,8,16" if args.simulate_gpu else "1,2"
    return args


def _run(client: httpx.Client, workers: Stack, lines: int, profiler: Profiler | None) -> Figures:
    """One job of ``lines`` lines; requests/s and CPU seconds per request by process."""
    items = workload.fixed(lines, MAX_TOKENS)
    meter = CpuMeter(_groups(workers))
    if profiler is not None:
        profiler.start()
    meter.start()
    started = time.time()
    job_id, _accept_s = upload_job(client, items)
    in_job = Request.job_id == job_id
    _wait_job(workers, job_id)
    cpu = meter.stop()
    if profiler is not None:
        profiler.stop()
    result = outcome(workers, in_job, lambda _id: MAX_TOKENS)
    elapsed = result.last_finished - started
    figures: Figures = {"rps": result.ok / elapsed, "ok": result.ok, "s": elapsed}
    # When the API had committed the last line: past ~``s``, admission sets the pace.
    with workers.sessions() as session:
        admitted = session.scalar(select(func.max(Request.created_at)).where(in_job))
        per_worker = list(
            session.scalars(
                select(func.count())
                .select_from(LedgerEntry)
                .join(Request, Request.id == LedgerEntry.request_id)
                .where(in_job)
                .group_by(LedgerEntry.worker)
            )
        )
    figures["admitted_s"] = as_utc(admitted).timestamp() - started if admitted else elapsed
    # The busiest worker's share over an even one: past 1, the run waits on its tail.
    figures["worker_share_max"] = max(per_worker) * (len(workers.processes) - 1) / sum(per_worker)
    figures["batch_mean"] = result.mean_batch_size
    machine = cpu.pop("machine")
    figures["machine_busy_cores"] = machine / elapsed
    per_request = {f"cpu_ms_{name}": 1000 * s / max(result.ok, 1) for name, s in cpu.items()}
    workers_ms = [v for k, v in per_request.items() if k.startswith("cpu_ms_worker")]
    figures["cpu_ms_workers"] = sum(workers_ms)
    figures["cpu_ms_worker_max"] = max(workers_ms)
    figures.update({k: v for k, v in per_request.items() if not k.startswith("cpu_ms_worker")})
    figures["cpu_ms_total"] = sum(per_request.values())
    # A group's busy share of one core over the run: the one near 1.0 holds the rest back.
    busiest = max(cpu.items(), key=lambda kv: kv[1])
    figures["busiest_core_share"] = busiest[1] / elapsed
    return figures


def _wait_job(stack: Stack, job_id: uuid.UUID) -> None:
    """Until the job is stamped finished: one row read a poll, where counting the job's
    finished requests (``bench.stack.wait_finished``) took a Postgres backend a quarter of
    its time at this rate. Every few seconds it also asks whether anything of the job is
    still open, so a job left unstamped cannot hang the run."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    polls = 0
    while time.monotonic() < deadline:
        stack.check_alive()
        with stack.sessions() as session:
            job = session.get(Job, job_id, populate_existing=True)
            if job is not None and job.finished_at is not None:
                return
            polls += 1
            if job is not None and job.status != JobStatus.VALIDATING and not polls % 50:
                still_open = Request.status.in_(OPEN_STATUSES)
                if not session.scalar(select(exists().where(Request.job_id == job_id, still_open))):
                    print(f"bench: job {job_id} finished but was never stamped", flush=True)
                    return
        time.sleep(0.05)
    raise SystemExit(f"bench: job {job_id} did not finish within {RUN_TIMEOUT_S} s")


def _profiler(stack: Stack) -> Profiler:
    api, first, *_ = stack.processes
    return Profiler({"api": api.pid, "worker1": first.pid})


def _groups(stack: Stack) -> dict[str, Picker]:
    api, *workers = stack.processes
    database_name = stack.settings.database_url.rsplit("/", 1)[-1]
    groups: dict[str, Picker] = {"api": tree(api.pid)}
    groups.update({f"worker{i + 1}": tree(w.pid) for i, w in enumerate(workers)})
    groups["postgres_backends"] = command("postgres: ", database_name)
    groups["postgres_shared"] = _postgres_shared
    groups["redis"] = command("redis-server")
    groups["bench"] = tree(os.getpid())
    return groups


def _postgres_shared(proc: Proc, _procs: object) -> bool:
    """The server's own processes (WAL writer, checkpointer, ...), not other databases'."""
    aux = ("writer", "checkpointer", "autovacuum", "launcher", "bin/postgres")
    return "postgres" in proc.cmdline and any(name in proc.cmdline for name in aux)


def _medians(rounds: dict[int, list[Figures]]) -> dict[int, Figures]:
    return {
        n: {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
        for n, runs in rounds.items()
    }


def _busiest(figures: Figures) -> tuple[str, float]:
    """The process group that used the most of a core over the run, and how much."""
    groups = {
        k.removeprefix("cpu_ms_"): v * figures["rps"] / 1000
        for k, v in figures.items()
        if k.startswith("cpu_ms_") and k not in ("cpu_ms_total", "cpu_ms_workers")
    }
    name = max(groups, key=lambda k: groups[k])
    return name.replace("worker_max", "a worker"), round(groups[name], 3)


def _report(rounds: dict[int, list[Figures]], *, simulate: bool) -> dict[str, object]:
    """Medians by worker count, the busiest process at each; with ``simulate``, each count's
    rate over N times one worker's (within a round) and the first count under 0.9 of it."""
    medians = _medians(rounds)
    report: dict[str, object] = {
        "by_workers": medians,
        "busiest": {n: _busiest(f) for n, f in medians.items() if "rps" in f and len(f) > 2},
    }
    if simulate and 1 in rounds:
        ratios = {
            n: round(
                statistics.median(
                    r["rps"] / (n * o["rps"]) for r, o in zip(runs, rounds[1], strict=False)
                ),
                3,
            )
            for n, runs in rounds.items()
        }
        report["ratio_to_linear"] = ratios
        bend = next((n for n, ratio in sorted(ratios.items()) if ratio < 0.9), None)
        report["bends_at"] = bend
        if bend is not None:
            report["why"] = _why(medians[bend], os.cpu_count() or 1)
    return report


def _why(figures: Figures, cores: int) -> list[str]:
    """What the run at the bend waited on, from its own figures."""
    reasons = []
    if "s" not in figures:
        return reasons
    if figures["admitted_s"] > 0.5 * figures["s"]:
        reasons.append(
            f"admission: the last line was admitted {figures['admitted_s']:.1f} s into a "
            f"{figures['s']:.1f} s run (the API's lines per second; see --profile)"
        )
    if figures["machine_busy_cores"] > 0.65 * cores:
        reasons.append(
            f"CPU: the machine was {figures['machine_busy_cores']:.2f} of its {cores} cores "
            f"busy, the pipeline {figures['cpu_ms_total'] * figures['rps'] / 1000:.2f} of them"
        )
    if figures["worker_share_max"] > 1.05:
        reasons.append(
            f"tail: the busiest worker ran {figures['worker_share_max']:.2f} times an even "
            "share while others had finished"
        )
    return reasons or ["not admission, CPU or the tail: compare the processes' CPU figures"]


def _show(label: str, figures: Figures) -> str:
    return f"{label}: " + ", ".join(f"{k} {v:.3g}" for k, v in figures.items())


def _config(batch: int, options: dict[str, object]) -> dict[str, object]:
    model = {
        "engine": "scripted",
        "max_model_len": 512,
        "max_batch_size": batch,
        "batch_window_ms": 50,
        "price_per_gpu_hour": 2.0,
        "options": options,
    }
    return {"models": {MODEL: model}, "routes": [{"task": "*", "model": MODEL}]}


@contextmanager
def _api(batch: int, options: dict[str, object]) -> Iterator[tuple[Stack, Settings]]:
    """A fresh database and Redis db, the config, and `inferq api`, answering."""
    admin = os.environ.get("INFERQ_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    broker = os.environ.get("INFERQ_BENCH_BROKER_URL", "redis://127.0.0.1:6379/13")
    logs = Path(tempfile.mkdtemp(prefix="inferq-pipeline-"))
    config = logs / "config.yaml"
    config.write_text(yaml.safe_dump(_config(batch, options)))
    with database(admin) as database_url:
        settings = Settings(database_url=database_url, broker_url=broker, config=config)
        redis.Redis.from_url(broker).flushdb()
        engine = make_engine(database_url)
        sessions = make_sessionmaker(engine)
        with sessions.begin() as session:
            _tenant, key = create_tenant(session, "bench")
        command = [*_cli(), "api", "--port", str(PORT)]
        api = _spawn(command, service_env(settings), logs / "api.log")
        stack = Stack(f"http://127.0.0.1:{PORT}", key, settings, sessions, [api], logs)
        try:
            _wait(stack, lambda: _healthy(stack.url), "the API did not start")
            yield stack, settings
        finally:
            stop([api])
            engine.dispose()
            redis.Redis.from_url(broker).flushdb()


@contextmanager
def _workers(api: Stack, settings: Settings, n: int) -> Iterator[Stack]:
    """``n`` `inferq worker` processes, each consuming (answering a ping) before it yields."""
    processes = [
        _spawn(
            [*_cli(), "worker", "--model", MODEL, "--loglevel", "WARNING"],
            {**service_env(settings), "INFERQ_WORKER_NAME": f"bench-{i + 1}"},
            api.logs / f"worker{i + 1}.log",
        )
        for i in range(n)
    ]
    stack = Stack(api.url, api.key, settings, api.sessions, [*api.processes, *processes], api.logs)
    celery = create_celery(settings, load_config(settings.config))
    try:
        _wait(stack, lambda: len(celery.control.ping(timeout=0.5)) >= n, "workers did not start")
        yield stack
    finally:
        _stop(processes)
        celery.close()


def _stop(processes: Sequence[subprocess.Popen[bytes]], grace_s: float = 150.0) -> None:
    """SIGTERM, then what has not exited within ``grace_s`` (a worker drains what it holds
    first, workers.drain) is killed, so one slow drain does not end the benchmark."""
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            print(f"bench: worker {process.pid} still draining after {grace_s} s; killed")
            process.kill()
            process.wait()


def _cli() -> list[str]:
    return [sys.executable, "-m", "inferq.cli", "--log-level", "WARNING"]


def _spawn(command: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _wait(stack: Stack, ready: Callable[[], bool], failure: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        stack.check_alive()
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {failure}; logs in {stack.logs}")
        time.sleep(0.2)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
