"""The continuous feed on real Postgres with the scripted step engine: requests leave when
they finish, interactive work enters a full engine, batch work keeps its share, cancel and
deadlines abort inside the engine, and a failing or wedged engine is handled."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.enums import Outcome, Priority, RequestStatus
from router.config import RouterConfig
from storage.requests import cancel_request
from storage.tables import LedgerEntry, Request
from tasks.contract import RunMessage
from tests.conftest import queued_runs, wait_for
from workers.consumer import Credit
from workers.engines.scripted import Rule
from workers.engines.scripted_steps import ScriptedStepEngine
from workers.runtime import WorkerRuntime

BATCH_SLOTS = 6
CONFIG = RouterConfig.model_validate(
    {
        "models": {
            "s": {
                "engine": "scripted",
                "max_batch_size": BATCH_SLOTS,
                "price_per_gpu_hour": 3.6,
                "timeout_s": 30,
            }
        },
        "routes": [{"task": "*", "model": "s"}],
    }
)


@pytest.fixture
def engine() -> ScriptedStepEngine:
    return ScriptedStepEngine(
        slots=BATCH_SLOTS + 2,
        step_s=0.01,
        rules=[Rule(match="POISON", fail="poisoned step"), Rule(match="WEDGE", hang=True)],
        refuse={"REFUSE": "cannot take this one"},
    )


class Wedged:
    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.event = threading.Event()

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)
        self.event.set()


@pytest.fixture
def wedged() -> Wedged:
    return Wedged()


@pytest.fixture
def runtime(
    engine: ScriptedStepEngine, make_runtime: Callable[..., WorkerRuntime], wedged: Wedged
) -> Iterator[WorkerRuntime]:
    yield make_runtime(
        engine, config=CONFIG, model="s", worker_name="feeder-test", stall_s=1.0, on_wedged=wedged
    )
    engine.close()  # before the runtime stops: a wedged step lets go


def queued(
    sessions: sessionmaker[Session],
    tenant_id: uuid.UUID,
    prompts: list[str],
    *,
    max_tokens: int = 4,
    priority: Priority = Priority.BATCH,
    deadline: datetime | None = None,
) -> list[RunMessage]:
    """Committed requests and their messages; each answers ``max_tokens`` words, one a step."""
    return queued_runs(
        sessions,
        tenant_id,
        prompts,
        model="s",
        max_tokens=max_tokens,
        ignore_eos=True,
        priority=priority,
        deadline=deadline,
    )


def ledger(sessions: sessionmaker[Session], request_id: str) -> list[LedgerEntry]:
    with sessions() as session:
        return list(
            session.scalars(
                select(LedgerEntry).where(LedgerEntry.request_id == uuid.UUID(request_id))
            )
        )


def request(sessions: sessionmaker[Session], request_id: str) -> Request:
    with sessions() as session:
        row = session.get(Request, uuid.UUID(request_id))
        assert row is not None
        return row


def test_a_short_request_leaves_while_its_long_neighbour_runs(
    runtime: WorkerRuntime, sessions: sessionmaker[Session], tenant_id: uuid.UUID
) -> None:
    [long] = queued(sessions, tenant_id, ["long"], max_tokens=400)
    [short] = queued(sessions, tenant_id, ["short"], max_tokens=3)
    long_done = runtime.submit(long)
    assert runtime.submit(short).result(timeout=30) is Outcome.SUCCEEDED
    assert not long_done.done()  # committed on its own, not when the batch ends
    assert request(sessions, short.request_id).status is RequestStatus.SUCCEEDED
    assert long_done.result(timeout=60) is Outcome.SUCCEEDED
    [row] = ledger(sessions, long.request_id)
    assert row.completion_tokens == 400 and row.gpu_seconds > 0


def test_interactive_enters_a_full_engine_and_batch_keeps_its_share(
    runtime: WorkerRuntime,
    engine: ScriptedStepEngine,
    sessions: sessionmaker[Session],
    tenant_id: uuid.UUID,
) -> None:
    bulk = queued(sessions, tenant_id, [f"bulk {i}" for i in range(20)], max_tokens=60)
    bulk_done = [runtime.submit(m) for m in bulk]
    wait_for(lambda: len(engine.steps) > 3, timeout=30, what="the engine full of batch work")
    assert max(len(step) for step in engine.steps) == BATCH_SLOTS  # batch never takes more
    urgent = queued(
        sessions, tenant_id, [f"urgent {i}" for i in range(10)], priority=Priority.INTERACTIVE
    )
    urgent_done = [runtime.submit(m) for m in urgent]
    assert {f.result(timeout=30) for f in urgent_done} == {Outcome.SUCCEEDED}
    assert not all(f.done() for f in bulk_done)  # they went ahead of the queued bulk work
    urgent_ids = {m.request_id for m in urgent}
    mixed = [s for s in engine.steps if urgent_ids & set(s)]
    # Every step with interactive work in it still ran batch work: its guaranteed share.
    assert all(len(set(s) - urgent_ids) >= BATCH_SLOTS // 4 for s in mixed)
    assert {f.result(timeout=60) for f in bulk_done} == {Outcome.SUCCEEDED}


def test_cancel_aborts_inside_the_engine_and_charges_cancelled(
    runtime: WorkerRuntime,
    engine: ScriptedStepEngine,
    sessions: sessionmaker[Session],
    tenant_id: uuid.UUID,
) -> None:
    [message] = queued(sessions, tenant_id, ["a long one"], max_tokens=100_000)
    done = runtime.submit(message)
    wait_for(lambda: len(engine.steps) > 5, timeout=30, what="the request to run")
    with sessions.begin() as session:
        assert cancel_request(session, uuid.UUID(message.request_id), datetime.now(UTC))
    assert done.result(timeout=30) is Outcome.CANCELLED  # aborted: it would never end
    assert not engine.has_unfinished()
    [row] = ledger(sessions, message.request_id)
    assert row.outcome is Outcome.CANCELLED
    assert row.completion_tokens > 0 and row.gpu_seconds > 0  # what it used is charged
    assert request(sessions, message.request_id).status is RequestStatus.CANCELLED


def test_a_deadline_passing_in_the_engine_aborts_it(
    runtime: WorkerRuntime,
    engine: ScriptedStepEngine,
    sessions: sessionmaker[Session],
    tenant_id: uuid.UUID,
) -> None:
    deadline = datetime.now(UTC) + timedelta(seconds=1.5)
    [message] = queued(sessions, tenant_id, ["slow"], max_tokens=100_000, deadline=deadline)
    assert runtime.submit(message).result(timeout=15) is Outcome.TIMED_OUT
    row = request(sessions, message.request_id)
    assert row.status is RequestStatus.EXPIRED
    assert not engine.has_unfinished()


def test_a_failing_step_fails_its_culprit_alone(
    runtime: WorkerRuntime, sessions: sessionmaker[Session], tenant_id: uuid.UUID
) -> None:
    prompts = [f"item {i}" for i in range(5)]
    prompts[2] = "POISON pill"
    futures = [runtime.submit(m) for m in queued(sessions, tenant_id, prompts, max_tokens=6)]
    outcomes = [f.result(timeout=30) for f in futures]
    assert outcomes == [Outcome.SUCCEEDED] * 2 + [Outcome.FAILED] + [Outcome.SUCCEEDED] * 2
    with sessions() as session:
        errors = session.scalars(
            select(Request.error).where(Request.tenant_id == tenant_id, Request.error.is_not(None))
        ).all()
    assert errors == ["EngineError: poisoned step"]


def test_a_request_the_engine_refuses_fails_alone(
    runtime: WorkerRuntime, sessions: sessionmaker[Session], tenant_id: uuid.UUID
) -> None:
    messages = queued(sessions, tenant_id, ["fine", "REFUSE me", "also fine"])
    outcomes = [runtime.submit(m).result(timeout=30) for m in messages]
    assert outcomes == [Outcome.SUCCEEDED, Outcome.FAILED, Outcome.SUCCEEDED]
    assert request(sessions, messages[1].request_id).error == "ValueError: cannot take this one"


def test_a_wedged_engine_stops_the_worker_and_its_leases(
    runtime: WorkerRuntime, wedged: Wedged, sessions: sessionmaker[Session], tenant_id: uuid.UUID
) -> None:
    [message] = queued(sessions, tenant_id, ["WEDGE the engine"])
    runtime.submit(message)
    assert wedged.event.wait(timeout=30), "the watchdog never fired"
    assert "no engine step returned for 1s" in wedged.reasons[0]
    assert not runtime.leases.progressing()  # its requests' leases are no longer renewed


def test_credit_lets_in_a_message_only_while_requests_in_progress_are_under_the_bound() -> None:
    prefetch: list[int] = []
    credit = Credit(10, prefetch.append)
    credit.took(8)  # a bundle of 8: under 10, one more message may come
    credit.took(8)  # 16 in progress: no more than the two it holds
    for _ in range(7):  # the first bundle's requests finish but its last: 9 in progress
        credit.finished()
    credit.finished()  # 8 in progress; the first message is acknowledged
    credit.settled()
    for _ in range(8):
        credit.finished()
    credit.settled()
    assert prefetch == [2, 3, 2, 1]


def test_credit_with_ready_lets_in_one_more_only_when_the_engine_wants_it() -> None:
    prefetch: list[int] = []
    wants = [False]
    credit = Credit(10, prefetch.append, lambda: wants[0])
    credit.took(4)  # under the bound, but the engine does not want more yet
    assert prefetch == []  # stays at the one it started with
    wants[0] = True
    credit.refresh()  # the consumer's timer asks again
    assert prefetch == [2]
    wants[0] = False
    credit.refresh()
    assert prefetch == [2, 1]
