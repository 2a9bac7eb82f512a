"""Fault injection on real processes: while a job of 2,000 requests runs, kill -9 workers,
kill -9 Redis, stop Postgres for 20 s, crash the API between commit and publish, poison and
hang the engine, and deliver messages twice. Afterwards every request must have reached
exactly one terminal state with at most one successful result, and every execution that
committed must be in the ledger. Each test prints its figures (run with ``-s``)."""

from __future__ import annotations

import re
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.enums import OPEN_STATUSES, Outcome, Priority, RequestStatus, TaskKind
from router import load_config
from storage.db import make_engine, make_sessionmaker
from storage.migrate import upgrade
from storage.tables import Job, LedgerEntry, Request
from tasks.app import create_celery
from tasks.holdings import HOLDERS_KEY, held_key
from tasks.rows import run_message
from tests.conftest import NewTenant, Process, new_tenant, publish_bundled, stop, wait_for
from tests.faultkit import (
    DRAIN_TIMEOUT_S,
    PostgresServer,
    RedisServer,
    Stack,
    check_invariant,
    is_ready,
    kill9,
    seconds_until,
    settled,
    status_counts,
)
from weights.tiny import ensure_tiny_model

JOB_SIZE = 2000
BATCH = 32
CONFIG = f"""
models:
  tiny:
    engine: vllm
    path: "builtin:tiny"
    max_model_len: 512
    max_batch_size: {BATCH}
    batch_window_ms: 50
    options: {{dtype: float32}}
  scripted:
    engine: scripted
    path: "builtin:tiny"
    max_batch_size: {BATCH}
    batch_window_ms: 20
    timeout_s: 1.0
    options:
      delay_ms: 60
      rules:
        - {{match: POISON, fail: "poisoned input"}}
        - {{match: HANG, delay_s: 1.5}}
routes:
  - {{task: "*", model: scripted}}
# Faults are injected on purpose here: the breaker must not cool the model down between tests.
breaker: {{failures: 100000}}
"""
# Short leases so recovery takes seconds; jobs admitted in the background, a few hundred
# requests open at a time, so a re-published request waits behind a short queue.
FAST_RECOVERY = {
    "running_lease_s": 3,
    "queued_lease_s": 10,
    "reconcile_interval_s": 1,
    "inline_job_lines": 100,
    "admission_chunk_lines": 100,
    "admission_max_open": 300,
}


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.init()
    server.start()
    upgrade(server.url)
    yield server
    server.remove()


@pytest.fixture(scope="module")
def db(postgres: PostgresServer) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(postgres.url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def tenant(db: sessionmaker[Session]) -> NewTenant:
    """A tenant per test, in this module's own Postgres: the invariant is checked over this
    test's requests only."""
    return new_tenant(db, "faults")


def build_stack(
    database_url: str, broker_url: str, log_dir: Path, config_text: str, **settings: object
) -> Stack:
    """A stack on these servers with its own models file (written into ``log_dir``)."""
    config = log_dir / "models.yaml"
    config.write_text(config_text)
    return Stack.build(
        database_url=database_url,
        broker_url=broker_url,
        config=config,
        log_dir=log_dir,
        **settings,
    )


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(
    postgres: PostgresServer, broker: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The API and a scripted worker, shared by the tests (each repairs what it breaks)."""
    built = build_stack(
        postgres.url, broker.url, tmp_path_factory.mktemp("fault-logs"), CONFIG, **FAST_RECOVERY
    )
    worker = built.worker("scripted", wait=False)
    built.api()
    built.wait_ready(worker)
    yield built
    built.stop_all()


def submit_job(url: str, tenant: NewTenant, prompts: list[str], **spec: object) -> str:
    body = {
        "task": "complete",
        "items": [{"id": str(n), "prompt": p} for n, p in enumerate(prompts)],
    }
    response = httpx.post(
        f"{url}/v1/jobs",
        json={**body, **spec},
        headers={"Authorization": f"Bearer {tenant.key}"},
        timeout=120,
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def prompts(count: int = JOB_SIZE) -> list[str]:
    return [f"request {n} of the fault job" for n in range(count)]


def succeeded(db: sessionmaker[Session], tenant: NewTenant) -> int:
    return status_counts(db, tenant.id).get(RequestStatus.SUCCEEDED.value, 0)


def ledger_rows(db: sessionmaker[Session], tenant: NewTenant) -> int:
    with db() as session:
        query = select(func.count()).where(LedgerEntry.tenant_id == tenant.id)
        return int(session.scalar(query) or 0)


def drain(db: sessionmaker[Session], tenant: NewTenant, expected: int, since: float) -> float:
    return seconds_until(
        lambda: settled(db, tenant.id, expected),
        since=since,
        timeout=DRAIN_TIMEOUT_S,
        what=f"{expected} requests to finish",
    )


def open_ids(db: sessionmaker[Session], tenant: NewTenant, status: RequestStatus) -> set[uuid.UUID]:
    with db() as session:
        query = select(Request.id).where(Request.tenant_id == tenant.id, Request.status == status)
        return set(session.scalars(query))


def all_finished(db: sessionmaker[Session], ids: set[uuid.UUID]) -> bool:
    with db() as session:
        query = select(func.count()).where(Request.id.in_(ids), Request.status.in_(OPEN_STATUSES))
        return not session.scalar(query)


def test_poison_fails_alone_and_a_hung_call_times_out(
    stack: Stack, db: sessionmaker[Session], tenant: NewTenant
) -> None:
    job = prompts()
    poison = {7, 300, 301, 1200, 1999}
    for n in poison:
        job[n] = f"POISON {n}"
    job[1990] = "HANG past the timeout"
    begun = time.monotonic()
    submit_job(stack.url, tenant, job)
    drained_s = drain(db, tenant, JOB_SIZE, begun)
    figures = check_invariant(db, tenant.id, expected=JOB_SIZE)
    with db() as session:
        failed = session.execute(
            select(Request.line, Request.error, LedgerEntry.outcome)
            .join(LedgerEntry, LedgerEntry.request_id == Request.id)
            .where(Request.tenant_id == tenant.id, Request.status == RequestStatus.FAILED)
        ).all()
    by_line = {line - 1: (error, outcome) for line, error, outcome in failed}
    timed_out = {n for n, (_error, outcome) in by_line.items() if outcome is Outcome.TIMED_OUT}
    figures.show(
        "poison + hung engine call",
        poisoned=len(poison),
        timed_out=len(timed_out),
        seconds_to_drain=drained_s,
    )
    # Poison is isolated: only the poisoned requests of their batches fail.
    assert {n: by_line[n][1] for n in poison} == dict.fromkeys(poison, Outcome.FAILED)
    assert all("poisoned input" in by_line[n][0] for n in poison)
    # A call past timeout_s fails its batch as timed out (and only its batch).
    assert 1990 in timed_out and len(timed_out) <= BATCH
    assert all("no answer within 1s" in by_line[n][0] for n in timed_out)
    assert set(by_line) == poison | timed_out
    assert figures.by_status == {"succeeded": JOB_SIZE - len(by_line), "failed": len(by_line)}


def committed_unpublished(
    db: sessionmaker[Session], tenant: NewTenant, count: int, *, tag: str
) -> list[Request]:
    """Rows as the API commits them (queued, lease taken), whose publish never happens."""
    now = datetime.now(UTC)
    rows = [
        Request(
            tenant_id=tenant.id,
            task=TaskKind.COMPLETE,
            status=RequestStatus.QUEUED,
            priority=Priority.BATCH,
            model="scripted",
            input={"prompt": f"{tag} {n}"},
            params={"max_tokens": 8},
            created_at=now,
            queued_at=now,
            published_at=now,
        )
        for n in range(count)
    ]
    with db.begin() as session:
        session.add_all(rows)
        session.flush()
        for row in rows:
            session.expunge(row)
    return rows


def publish_directly(
    stack: Stack, tenant: NewTenant, rows: list[Request], *, bundle: int, copies: int = 1
) -> None:
    """Publish committed rows as the API would, ``bundle`` requests a message, each message
    ``copies`` times in a row."""
    assert all(row.tenant_id == tenant.id and row.model == "scripted" for row in rows)
    messages = [run_message(row) for row in rows]
    config = load_config(stack.settings.config)
    celery = create_celery(stack.settings, config)
    for start in range(0, len(messages), bundle):
        for _copy in range(copies):
            publish_bundled(celery, config, messages[start : start + bundle], bundle=bundle)


def test_same_message_delivered_twice_runs_once(
    stack: Stack, db: sessionmaker[Session], tenant: NewTenant
) -> None:
    rows = committed_unpublished(db, tenant, JOB_SIZE, tag="twice")
    begun = time.monotonic()
    # A message and its copy fit one batch: the worst case, both claimed at once.
    publish_directly(stack, tenant, rows, bundle=BATCH // 2, copies=2)
    drained_s = drain(db, tenant, JOB_SIZE, begun)
    figures = check_invariant(db, tenant.id, expected=JOB_SIZE)
    with db() as session:
        claims = session.scalar(
            select(func.sum(Request.deliveries)).where(Request.tenant_id == tenant.id)
        )
    figures.show(
        "same message twice", deliveries=2 * JOB_SIZE, claims=claims, seconds_to_drain=drained_s
    )
    assert figures.by_status == {"succeeded": JOB_SIZE}
    assert figures.duplicate_results == 0
    assert figures.duplicate_executions == 0  # the second copy is settled unrun
    assert claims == JOB_SIZE


def test_redis_killed_mid_job_and_restarted_empty(
    stack: Stack, broker: RedisServer, db: sessionmaker[Session], tenant: NewTenant
) -> None:
    # Small messages, so that more wait in Redis than a worker prefetches (64 messages).
    rows = committed_unpublished(db, tenant, JOB_SIZE, tag="redis")
    publish_directly(stack, tenant, rows, bundle=4)
    wait_for(
        lambda: succeeded(db, tenant) >= 100 and broker.queued_messages() >= 10,
        timeout=120,
        what="the job to be under way with messages waiting in Redis",
    )
    in_redis = broker.queued_messages()
    broker.kill()  # every message waiting in it is gone (workers restore their unacked ones)
    lost = open_ids(db, tenant, RequestStatus.QUEUED)
    broker.start()
    restarted = time.monotonic()
    recover_s = seconds_until(
        lambda: all_finished(db, lost),
        since=restarted,
        timeout=120,
        what="the requests queued in the killed Redis to finish",
    )
    drained_s = drain(db, tenant, JOB_SIZE, restarted)
    figures = check_invariant(db, tenant.id, expected=JOB_SIZE)
    figures.show(
        "redis kill -9",
        messages_lost=in_redis,
        queued_when_killed=len(lost),
        seconds_to_recover=recover_s,
        seconds_to_drain=drained_s,
    )
    assert lost  # the fault really lost messages
    assert figures.by_status == {"succeeded": JOB_SIZE}
    assert all(p.proc.poll() is None for p in stack.processes), "a process died with Redis"


def test_postgres_stopped_for_20s_mid_job(
    stack: Stack, postgres: PostgresServer, db: sessionmaker[Session], tenant: NewTenant
) -> None:
    job_id = submit_job(stack.url, tenant, prompts())
    wait_for(lambda: succeeded(db, tenant) >= 400, timeout=120, what="the job to be under way")
    postgres.stop("fast")
    stopped = time.monotonic()
    headers = {"Authorization": f"Bearer {tenant.key}"}
    during = httpx.get(f"{stack.url}/v1/jobs/{job_id}", headers=headers, timeout=30)
    time.sleep(max(0.0, 20 - (time.monotonic() - stopped)))  # the fault: 20 s without Postgres
    postgres.start()
    db.kw["bind"].dispose()  # our own pooled connections died with the server
    started = time.monotonic()
    before = ledger_rows(db, tenant)
    recover_s = seconds_until(
        lambda: ledger_rows(db, tenant) > before,
        since=started,
        timeout=120,
        what="workers to commit again after Postgres came back",
    )
    drained_s = drain(db, tenant, JOB_SIZE, started)
    figures = check_invariant(db, tenant.id, expected=JOB_SIZE)
    figures.show("postgres down 20 s", seconds_to_recover=recover_s, seconds_to_drain=drained_s)
    assert during.status_code == 503 and during.headers["Retry-After"].isdigit(), during.text
    assert figures.by_status == {"succeeded": JOB_SIZE}


def job_total(db: sessionmaker[Session], job_id: str) -> int:
    with db() as session:
        job = session.get(Job, uuid.UUID(job_id))
        return job.total if job is not None else 0


def test_api_crash_between_commit_and_publish(
    stack: Stack, db: sessionmaker[Session], tenant: NewTenant
) -> None:
    api = next(p for p in reversed(stack.processes) if p.name.startswith("api"))
    job_id = submit_job(stack.url, tenant, prompts())
    wait_for(lambda: job_total(db, job_id) >= 600, timeout=120, what="admission to be under way")
    crashed = kill9(api)  # mid-admission: a chunk may be committed and not yet published
    admitted = job_total(db, job_id)
    # The exact window, made certain: rows committed by an API that died before publishing.
    orphans = {row.id for row in committed_unpublished(db, tenant, 100, tag="orphan")}
    stack.api()
    restarted = time.monotonic()
    recover_s = seconds_until(
        lambda: all_finished(db, orphans),
        since=crashed,
        timeout=120,
        what="the new API's reconciler to deliver the orphaned requests",
    )
    drained_s = drain(db, tenant, JOB_SIZE + len(orphans), restarted)
    figures = check_invariant(db, tenant.id, expected=JOB_SIZE + len(orphans))
    figures.show(
        "api kill -9 between commit and publish",
        admitted_before_crash=admitted,
        orphans=len(orphans),
        seconds_from_crash_to_recover=recover_s,
        seconds_to_drain=drained_s,
    )
    assert admitted < JOB_SIZE  # it crashed mid-admission; the new API admitted the rest
    assert figures.by_status == {"succeeded": JOB_SIZE + len(orphans)}


KILLS = 5
KILL_JOB = 1000  # about twice what the workers run while the five kills happen
MAX_TOKENS = 128  # generations long enough that the job outlasts the kills
# A queued lease longer than a message waits behind a short queue, so none is re-published.
VLLM_RECOVERY = {**FAST_RECOVERY, "queued_lease_s": 30, "admission_max_open": 200}


@pytest.fixture
def vllm_stack(tmp_path: Path) -> Iterator[tuple[Stack, sessionmaker[Session]]]:
    """Postgres, Redis and an API of its own, so no other reconciler touches its requests."""
    postgres, broker = PostgresServer(), RedisServer(tmp_path)
    postgres.init()
    postgres.start()
    upgrade(postgres.url)
    broker.start()
    built = build_stack(postgres.url, broker.url, tmp_path, CONFIG, **VLLM_RECOVERY)
    engine = make_engine(postgres.url)
    yield built, make_sessionmaker(engine)
    built.stop_all()
    engine.dispose()
    broker.stop()
    postgres.remove()


def held_by(db: sessionmaker[Session], tenant: NewTenant) -> dict[int, dict[uuid.UUID, int]]:
    """Running requests and their delivery counts, by the pid of the worker holding them
    (``claimed_by`` is ``model@host:pid``)."""
    with db() as session:
        query = select(Request.id, Request.deliveries, Request.claimed_by).where(
            Request.tenant_id == tenant.id, Request.status == RequestStatus.RUNNING
        )
        held: dict[int, dict[uuid.UUID, int]] = {}
        for request_id, deliveries, worker in session.execute(query):
            pid = int(str(worker).rsplit(":", 1)[-1])
            held.setdefault(pid, {})[request_id] = deliveries
        return held


def reclaimed(db: sessionmaker[Session], held: dict[uuid.UUID, int]) -> int | None:
    """How many held requests were claimed again (the dead worker's), or None while some
    are still waiting: each is either claimed again or finished by the live worker holding it."""
    with db() as session:
        rows = session.execute(
            select(Request.id, Request.status, Request.deliveries).where(Request.id.in_(held))
        ).all()
    waiting = any(
        deliveries == held[request_id] and not status.terminal
        for request_id, status, deliveries in rows
    )
    again = sum(deliveries > held[request_id] for request_id, _status, deliveries in rows)
    return None if waiting else again


def kill_mid_batch(stack: Stack, db: sessionmaker[Session], tenant: NewTenant) -> tuple[float, int]:
    """Kill -9 a live worker while it holds a batch; return the seconds until the requests it
    held were claimed again, and how many it held."""
    live = {p.proc.pid: p for p in stack.processes if "tiny" in p.name and is_ready(p)}
    busy: dict[int, dict[uuid.UUID, int]] = {}

    def a_worker_mid_batch() -> bool:
        busy.clear()
        busy.update({pid: rows for pid, rows in held_by(db, tenant).items() if pid in live})
        return bool(busy)

    wait_for(a_worker_mid_batch, timeout=120, what="a live worker mid-batch")
    # The worker whose requests were delivered least: five kills are five losses, not one
    # group of requests killed five times (max_deliveries rightly fails that as poison).
    pid, held = min(busy.items(), key=lambda kv: (max(kv[1].values()), -len(kv[1])))
    killed_at = kill9(live[pid])
    redelivery_s = seconds_until(
        lambda: reclaimed(db, held) is not None,
        since=killed_at,
        timeout=120,
        what="the dead worker's requests to be claimed again",
    )
    return redelivery_s, reclaimed(db, held) or 0


def test_vllm_workers_killed_mid_batch_five_times(
    vllm_stack: tuple[Stack, sessionmaker[Session]],
) -> None:
    stack, db = vllm_stack
    ensure_tiny_model(stack.settings.model_cache)  # built once, not by six workers at once
    workers = [stack.worker("tiny", wait=False) for _ in range(KILLS + 1)]
    stack.api()
    for worker in workers:
        stack.wait_ready(worker)
    tenant = new_tenant(db, "killed-workers")
    begun = time.monotonic()
    params = {"max_tokens": MAX_TOKENS, "ignore_eos": True}
    submit_job(stack.url, tenant, prompts(KILL_JOB), model="tiny", params=params)
    redeliveries, held = [], []
    for _kill in range(KILLS):
        seconds, count = kill_mid_batch(stack, db, tenant)
        redeliveries.append(round(seconds, 1))
        held.append(count)
    drained_s = drain(db, tenant, KILL_JOB, begun)
    figures = check_invariant(db, tenant.id, expected=KILL_JOB)
    with db() as session:
        rerun = session.scalar(
            select(func.count()).where(Request.tenant_id == tenant.id, Request.deliveries > 1)
        )
    figures.show(
        "vLLM worker kill -9 x5",
        held_by_the_killed=held,
        seconds_to_redeliver=redeliveries,
        requests_run_again=rerun,
        seconds_total=drained_s,
    )
    assert all(held), f"a kill found its worker between batches: {held}"
    assert figures.by_status == {"succeeded": KILL_JOB}


# --- scaling events: SIGTERM drains, a new worker joins, SIGKILL loses no prefetched work ---

DRAIN_CONFIG = """
models:
  drained:
    engine: scripted
    path: "builtin:tiny"
    max_batch_size: 8
    batch_window_ms: 20
    timeout_s: 5
    options: {delay_ms: 150}
  drained_steps:
    engine: scripted
    path: "builtin:tiny"
    max_batch_size: 8
    batch_window_ms: 20
    timeout_s: 5
    options: {continuous: true, step_ms: 30}
routes:
  - {task: "*", model: drained}
breaker: {failures: 100000}
"""
DRAIN_PREFIX = "drain:"
# Leases far longer than any wait below: a request that waited for one fails the test.
LONG_LEASES = {
    "running_lease_s": 600,
    "queued_lease_s": 600,
    "reconcile_interval_s": 1,
    "broker_key_prefix": DRAIN_PREFIX,
}
SCALE_JOB = 400


@pytest.fixture(scope="module")
def drain_stack(
    postgres: PostgresServer, broker: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """An API of its own, for models no other test's reconciler knows, under long leases."""
    built = build_stack(
        postgres.url, broker.url, tmp_path_factory.mktemp("drain-logs"), DRAIN_CONFIG, **LONG_LEASES
    )
    built.api()
    yield built
    built.stop_all()


def workers(stack: Stack, model: str, count: int) -> list[Process]:
    started = [stack.worker(model, wait=False) for _ in range(count)]
    for process in started:
        stack.wait_ready(process)
    return started


def holding_queued(
    broker: RedisServer, db: sessionmaker[Session], process: Process, model: str
) -> set[uuid.UUID]:
    """Requests a worker received (its holdings record, tasks.holdings) and never claimed."""
    client = redis.Redis(port=broker.port, socket_timeout=5)
    mine = f"{model}@{socket.gethostname()}:{process.proc.pid}/"
    holders = [h.decode() for h in client.zrange(f"{DRAIN_PREFIX}{HOLDERS_KEY}", 0, -1)]
    ids: set[uuid.UUID] = set()
    for holder in (h for h in holders if h.startswith(mine)):
        ids |= {uuid.UUID(m.decode()) for m in client.smembers(DRAIN_PREFIX + held_key(holder))}
    with db() as session:
        query = select(Request.id).where(
            Request.id.in_(ids), Request.status == RequestStatus.QUEUED
        )
        return set(session.scalars(query))


def lapse_running_leases(db: sessionmaker[Session], worker: str) -> None:
    """Date back the lease of what ``worker`` was running, as if its running lease had passed."""
    with db.begin() as session:
        session.execute(
            update(Request)
            .where(Request.status == RequestStatus.RUNNING, Request.claimed_by == worker)
            .values(published_at=datetime.now(UTC) - timedelta(days=1))
        )


def ran_on(db: sessionmaker[Session], tenant: NewTenant, process: Process) -> int:
    with db() as session:
        query = select(func.count()).where(
            LedgerEntry.tenant_id == tenant.id,
            LedgerEntry.worker.endswith(f":{process.proc.pid}"),
        )
        return int(session.scalar(query) or 0)


@pytest.mark.parametrize("model", ["drained", "drained_steps"])
def test_sigterm_mid_job_drains_and_hands_back(
    drain_stack: Stack,
    broker: RedisServer,
    db: sessionmaker[Session],
    tenant: NewTenant,
    model: str,
) -> None:
    """Both engine kinds: static (micro-batcher) and continuous (intake and feeder)."""
    stopping, staying = workers(drain_stack, model, 2)
    begun = time.monotonic()
    submit_job(drain_stack.url, tenant, prompts(SCALE_JOB), model=model)
    wait_for(
        lambda: (
            stopping.proc.pid in held_by(db, tenant)
            and bool(holding_queued(broker, db, stopping, model))
        ),
        timeout=120,
        what="the worker to stop to run requests and hold more it has not started",
    )
    stopping.proc.send_signal(signal.SIGTERM)
    exit_code = stopping.proc.wait(timeout=60)
    drained_s = drain(db, tenant, SCALE_JOB, begun)  # bounded far below every lease
    figures = check_invariant(db, tenant.id, expected=SCALE_JOB)
    handed = re.findall(r"handed back (\d+) unstarted, (\d+) cut short", stopping.log.read_text())
    stop(staying)
    figures.show(
        f"SIGTERM mid-job ({model})",
        exit_code=exit_code,
        handed_back=handed,
        ran_by_the_stopped=ran_on(db, tenant, stopping),
        seconds_to_drain=drained_s,
    )
    assert exit_code == 0, stopping.tail()
    # It drained. Whether it held unstarted work at that moment is timing: tests/test_drain.py
    # hands back deterministically; here, whatever it held ran with no lease waited out.
    assert handed, stopping.tail()
    assert figures.by_status == {"succeeded": SCALE_JOB}
    assert figures.duplicate_executions == 0


def test_worker_started_mid_job_takes_a_share(
    drain_stack: Stack, db: sessionmaker[Session], tenant: NewTenant
) -> None:
    [first] = workers(drain_stack, "drained", 1)
    begun = time.monotonic()
    submit_job(drain_stack.url, tenant, prompts(2 * SCALE_JOB), model="drained")
    wait_for(lambda: succeeded(db, tenant) >= 40, timeout=120, what="the job to be under way")
    joined = drain_stack.worker("drained", wait=False)
    share_s = seconds_until(
        lambda: ran_on(db, tenant, joined) > 0,
        since=time.monotonic(),
        timeout=120,
        what="the new worker to run part of the job",
    )
    drained_s = drain(db, tenant, 2 * SCALE_JOB, begun)
    figures = check_invariant(db, tenant.id, expected=2 * SCALE_JOB)
    shares = [ran_on(db, tenant, p) for p in (first, joined)]
    for process in (first, joined):
        stop(process)
    figures.show(
        "worker joins mid-job",
        shares=shares,
        seconds_from_start_to_first_result=share_s,
        seconds_to_drain=drained_s,
    )
    assert figures.by_status == {"succeeded": 2 * SCALE_JOB}
    assert shares[1] > 0


def test_sigkill_prefetched_work_runs_again_before_the_queued_lease(
    drain_stack: Stack,
    broker: RedisServer,
    db: sessionmaker[Session],
    tenant: NewTenant,
) -> None:
    killed, staying = workers(drain_stack, "drained", 2)
    begun = time.monotonic()
    submit_job(drain_stack.url, tenant, prompts(SCALE_JOB), model="drained")
    prefetched: set[uuid.UUID] = set()

    def holds_unclaimed() -> bool:
        prefetched.update(holding_queued(broker, db, killed, "drained"))
        return bool(prefetched)

    wait_for(holds_unclaimed, timeout=120, what="the worker to hold prefetched requests")
    killed_at = kill9(killed)
    rerun_s = seconds_until(
        lambda: all_finished(db, prefetched),
        since=killed_at,
        timeout=120,  # the queued lease is 600 s
        what="the killed worker's prefetched requests to run elsewhere",
    )
    # What it had started waits for the running lease (600 s in this stack, 20 s by default),
    # so that no worker merely presumed dead is run over: lapse that lease now.
    lapse_running_leases(db, f"drained@{socket.gethostname()}:{killed.proc.pid}")
    drained_s = drain(db, tenant, SCALE_JOB, begun)
    figures = check_invariant(db, tenant.id, expected=SCALE_JOB)
    stop(staying)
    figures.show(
        "SIGKILL with prefetched messages",
        prefetched_unclaimed=len(prefetched),
        seconds_to_run_them=rerun_s,
        seconds_to_drain=drained_s,
    )
    assert figures.by_status == {"succeeded": SCALE_JOB}
