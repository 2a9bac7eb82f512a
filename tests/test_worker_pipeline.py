"""The worker's batcher, executor and writer on real Postgres with the scripted engine:
exact batch sizes, one transaction per batch, first success wins."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import cast

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.enums import Outcome, RequestStatus, TaskKind
from router.config import RouterConfig
from storage.ledger import Attempt, record_batch
from storage.tables import LedgerEntry, Request
from tasks.contract import RunMessage
from tests.conftest import queued_runs, wait_for
from workers.batcher import MicroBatcher, WorkItem
from workers.engines.scripted import Rule, ScriptedEngine
from workers.runtime import WorkerRuntime

CONFIG = RouterConfig.model_validate(
    {
        "models": {
            "s": {
                "engine": "scripted",
                "max_batch_size": 8,
                "batch_window_ms": 200,
                "price_per_gpu_hour": 3.6,
                "gpu_count": 2,
            }
        },
        "routes": [{"task": "*", "model": "s"}],
    }
)


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine(rules=[Rule(match="POISON", fail="poisoned")], delay_s=0.05)


@pytest.fixture
def runtime(engine: ScriptedEngine, make_runtime: Callable[..., WorkerRuntime]) -> WorkerRuntime:
    return make_runtime(engine, config=CONFIG, model="s")


def queued(
    sessions: sessionmaker[Session], tenant_id: uuid.UUID, prompts: list[str]
) -> list[RunMessage]:
    return queued_runs(sessions, tenant_id, prompts, model="s")


def test_buffered_requests_run_as_full_batches(
    runtime: WorkerRuntime,
    engine: ScriptedEngine,
    sessions: sessionmaker[Session],
    tenant_id: uuid.UUID,
) -> None:
    messages = queued(sessions, tenant_id, [f"item {i}" for i in range(20)])
    futures = [runtime.submit(m) for m in messages]
    assert [f.result(timeout=30) for f in futures] == [Outcome.SUCCEEDED] * 20
    assert engine.calls == [8, 8, 4]
    with sessions() as session:
        rows = session.scalars(select(LedgerEntry).where(LedgerEntry.tenant_id == tenant_id)).all()
        statuses = set(
            session.scalars(select(Request.status).where(Request.tenant_id == tenant_id))
        )
    assert statuses == {RequestStatus.SUCCEEDED}
    assert sorted(r.batch_size for r in rows) == [4] * 4 + [8] * 16
    by_batch: dict[uuid.UUID, list[LedgerEntry]] = {}
    for row in rows:
        by_batch.setdefault(row.batch_id, []).append(row)
    for batch in by_batch.values():
        # GPU-seconds of a batch are its engine time x GPUs, shared out by token count.
        assert sum(r.gpu_seconds for r in batch) == pytest.approx(batch[0].engine_s * 2)
        for r in batch:
            assert r.cost == pytest.approx(r.gpu_seconds * 3.6 / 3600)


def test_poison_is_isolated_by_splitting(
    runtime: WorkerRuntime,
    engine: ScriptedEngine,
    sessions: sessionmaker[Session],
    tenant_id: uuid.UUID,
) -> None:
    prompts = [f"item {i}" for i in range(8)]
    prompts[5] = "POISON"
    futures = [runtime.submit(m) for m in queued(sessions, tenant_id, prompts)]
    outcomes = [f.result(timeout=30) for f in futures]
    assert outcomes == [Outcome.SUCCEEDED] * 5 + [Outcome.FAILED] + [Outcome.SUCCEEDED] * 2
    # 8 → 4+4 → the poisoned half splits 2+2 → 1+1: five calls fail, the rest succeed.
    assert engine.calls[0] == 8 and sorted(engine.calls[1:]) == [1, 1, 2, 2, 4, 4]
    with sessions() as session:
        error = session.scalar(
            select(Request.error).where(Request.tenant_id == tenant_id, Request.status == "failed")
        )
    assert error == "EngineError: poisoned"


def test_redelivered_finished_request_is_not_run_again(
    runtime: WorkerRuntime,
    engine: ScriptedEngine,
    sessions: sessionmaker[Session],
    tenant_id: uuid.UUID,
) -> None:
    [message] = queued(sessions, tenant_id, ["once"])
    assert runtime.submit(message).result(timeout=30) is Outcome.SUCCEEDED
    calls = len(engine.calls)
    # The same message again (a broker redelivery): the claim finds it finished.
    assert runtime.submit(message).result(timeout=30) is Outcome.CANCELLED
    assert len(engine.calls) == calls
    with sessions() as session:
        count = len(
            session.scalars(
                select(LedgerEntry).where(LedgerEntry.request_id == uuid.UUID(message.request_id))
            ).all()
        )
    assert count == 1


def test_concurrent_second_execution_is_a_duplicate_and_first_result_wins(
    sessions: sessionmaker[Session], tenant_id: uuid.UUID
) -> None:
    """Two workers ran the same request (both claimed it while it was running)."""
    [message] = queued(sessions, tenant_id, ["twice"])
    request_id = uuid.UUID(message.request_id)
    now = datetime.now(UTC)

    def attempt(output: str) -> Attempt:
        return Attempt(
            request_id=request_id,
            tenant_id=tenant_id,
            task=TaskKind.COMPLETE,
            model="s",
            engine="scripted",
            worker="w",
            batch_id=uuid.uuid4(),
            batch_size=1,
            succeeded=True,
            output=output,
            error=None,
            prompt_tokens=1,
            completion_tokens=1,
            finish_reason="stop",
            queue_wait_s=0.0,
            engine_s=0.1,
            ttft_s=0.01,
            gpu_seconds=0.1,
            cost=0.001,
            started_at=now,
            first_token_at=now,
            finished_at=now,
        )

    with sessions.begin() as session:
        assert record_batch(session, [attempt("first")]) == [Outcome.SUCCEEDED]
    with sessions.begin() as session:
        assert record_batch(session, [attempt("second")]) == [Outcome.DUPLICATE]
    with sessions() as session:
        row = session.get(Request, request_id)
        outcomes = sorted(
            session.scalars(select(LedgerEntry.outcome).where(LedgerEntry.request_id == request_id))
        )
    assert row is not None and row.output == "first" and row.attempts == 1
    assert outcomes == [Outcome.DUPLICATE, Outcome.SUCCEEDED]


def test_cancelled_request_is_not_run(
    runtime: WorkerRuntime,
    engine: ScriptedEngine,
    sessions: sessionmaker[Session],
    tenant_id: uuid.UUID,
) -> None:
    [message] = queued(sessions, tenant_id, ["never"])
    with sessions.begin() as session:
        row = session.get(Request, uuid.UUID(message.request_id))
        assert row is not None
        row.status = RequestStatus.CANCELLED
    calls = len(engine.calls)
    assert runtime.submit(message).result(timeout=30) is Outcome.CANCELLED
    assert len(engine.calls) == calls


def test_request_past_its_deadline_expires_unrun(
    runtime: WorkerRuntime,
    engine: ScriptedEngine,
    sessions: sessionmaker[Session],
    tenant_id: uuid.UUID,
) -> None:
    [message] = queued(sessions, tenant_id, ["too late"])
    request_id = uuid.UUID(message.request_id)
    with sessions.begin() as session:
        row = session.get(Request, request_id)
        assert row is not None
        row.deadline_at = datetime.now(UTC)
    calls = len(engine.calls)
    assert runtime.submit(message).result(timeout=30) is Outcome.CANCELLED
    assert len(engine.calls) == calls
    with sessions() as session:
        row = session.get(Request, request_id)
        assert row is not None and row.status == RequestStatus.EXPIRED


def test_a_slow_engine_wants_its_next_batch_just_before_the_running_one_ends() -> None:
    """What the consumer lets in for a static engine (``MicroBatcher.fetch_in``): anything
    while idle or before the first batch's length is known; while a batch longer than the
    lead runs, nothing until the lead before it should end."""
    release = [threading.Event(), threading.Event()]
    started = threading.Semaphore(0)
    runs: list[int] = []

    def execute(batch: list[WorkItem]) -> None:
        started.release()
        release[len(runs)].wait(30)
        runs.append(len(batch))
        for item in batch:
            item.future.set_result(Outcome.SUCCEEDED)

    batcher = MicroBatcher(execute, max_batch_size=2, window_s=0.0)
    batcher.start()
    try:
        assert batcher.fetch_in(0.2) == 0.0  # idle, the batch length unknown
        batcher.submit(cast(RunMessage, object()))
        assert started.acquire(timeout=30)
        assert batcher.fetch_in(0.2) == 0.0  # the first batch: its length is not known yet
        time.sleep(0.5)  # the first batch takes 0.5 s
        release[0].set()
        batcher.submit(cast(RunMessage, object()))
        assert started.acquire(timeout=30)
        assert 0.1 < batcher.fetch_in(0.2) < 0.4  # 0.5 s batches: wanted 0.2 s before the end
        assert batcher.fetch_in(1.0) == 0.0  # a lead longer than a batch: wanted now
        release[1].set()
        wait_for(lambda: len(runs) == 2, timeout=30, what="the second batch to end")
        assert batcher.fetch_in(0.2) == 0.0  # idle again
    finally:
        for event in release:
            event.set()
        batcher.stop()
