"""A static engine's drain on real Postgres (workers.drain): the batch in the engine
finishes, what waited is handed back at once (queued, published again, not counted as a
delivery), and a batch still running at the deadline is handed back too. The continuous
engine's drain, and the whole SIGTERM path, are in tests/test_faults.py."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.enums import Outcome, RequestStatus
from core.settings import Settings
from router.config import RouterConfig
from storage.tables import Request
from tasks.contract import RunMessage
from tests.conftest import NewTenant, queued_runs, wait_for
from tests.test_compose import COMMIT_AND_CLOSE_S
from workers.consumer import COMMIT_S
from workers.drain import drain_grace_s
from workers.engines.scripted import Rule, ScriptedEngine
from workers.engines.scripted_steps import ScriptedStepEngine
from workers.runtime import WorkerRuntime

CONFIG = RouterConfig.model_validate(
    {
        "models": {
            "b": {"engine": "scripted", "max_batch_size": 4, "batch_window_ms": 0, "timeout_s": 30},
            "c": {"engine": "scripted", "max_batch_size": 2, "timeout_s": 30},
        },
        "routes": [{"task": "*", "model": "b"}],
    }
)


def rows(sessions: sessionmaker[Session], messages: list[RunMessage]) -> dict[str, Request]:
    ids = [uuid.UUID(m.request_id) for m in messages]
    with sessions() as session:
        found = session.scalars(select(Request).where(Request.id.in_(ids)))
        return {str(row.id): row for row in found}


def test_static_drain_finishes_its_batch_and_hands_back_the_rest(
    make_runtime: Callable[..., WorkerRuntime], sessions: sessionmaker[Session], tenant: NewTenant
) -> None:
    engine = ScriptedEngine(delay_s=0.3)
    published: list[RunMessage] = []
    runtime = make_runtime(
        engine, config=CONFIG, model="b", worker_name="drain-test", publish_runs=published.extend
    )
    messages = queued_runs(sessions, tenant.id, [f"drain {n}" for n in range(12)], model="b")
    futures = [runtime.submit(m) for m in messages]
    wait_for(lambda: bool(engine.calls), timeout=10, what="the first batch to start")
    unstarted, cut = runtime.drain(time.monotonic() + 10)
    wait_for(lambda: all(f.done() for f in futures), timeout=10, what="every request settled")
    outcomes = [f.result() for f in futures]
    ran = outcomes.count(Outcome.SUCCEEDED)
    assert (ran, unstarted, cut) == (engine.calls[0], 12 - ran, 0)
    assert outcomes.count(Outcome.CANCELLED) == 12 - ran
    stored = rows(sessions, messages)
    back = {m.request_id for m in published}
    assert back == {r for r, row in stored.items() if row.status is RequestStatus.QUEUED}
    assert len(back) == 12 - ran
    assert all(stored[r].deliveries == 0 for r in back)  # claimed or not, it never ran


def test_a_batch_running_past_the_grace_is_handed_back(
    make_runtime: Callable[..., WorkerRuntime], sessions: sessionmaker[Session], tenant: NewTenant
) -> None:
    engine = ScriptedEngine(rules=[Rule(match="HANG", hang=True)])
    published: list[RunMessage] = []
    runtime = make_runtime(
        engine, config=CONFIG, model="b", worker_name="drain-hang", publish_runs=published.extend
    )
    messages = queued_runs(sessions, tenant.id, ["HANG here"], model="b")
    [future] = [runtime.submit(m) for m in messages]
    wait_for(lambda: bool(engine.calls), timeout=10, what="the batch to start")
    try:
        assert runtime.drain(time.monotonic() + 0.3) == (0, 1)
        assert future.result(timeout=5) is Outcome.CANCELLED
        [row] = rows(sessions, messages).values()
        assert (row.status, row.deliveries) == (RequestStatus.QUEUED, 1)  # it did run
        assert [m.request_id for m in published] == [messages[0].request_id]
    finally:
        engine.close()


def test_continuous_drain_lets_the_engine_finish_and_hands_back_the_rest(
    make_runtime: Callable[..., WorkerRuntime], sessions: sessionmaker[Session], tenant: NewTenant
) -> None:
    engine = ScriptedStepEngine(slots=2, step_s=0.05)
    published: list[RunMessage] = []
    runtime = make_runtime(
        engine, config=CONFIG, model="c", worker_name="drain-steps", publish_runs=published.extend
    )
    messages = queued_runs(sessions, tenant.id, [f"drain {n}" for n in range(12)], model="c")
    futures = [runtime.submit(m) for m in messages]
    wait_for(lambda: bool(engine.steps), timeout=10, what="the engine to step")
    unstarted, cut = runtime.drain(time.monotonic() + 10)
    wait_for(lambda: all(f.done() for f in futures), timeout=10, what="every request settled")
    outcomes = [f.result() for f in futures]
    ran = outcomes.count(Outcome.SUCCEEDED)
    assert cut == 0 and ran >= 2 and unstarted == 12 - ran
    assert unstarted >= 6  # beyond what the intake claims (engine slots and a reserve)
    stored = rows(sessions, messages)
    back = {m.request_id for m in published}
    assert back == {r for r, row in stored.items() if row.status is RequestStatus.QUEUED}
    assert len(back) == 12 - ran
    assert all(stored[r].deliveries == 0 for r in back)


def test_the_default_grace_fits_the_deployments_grace_period() -> None:
    """Compose and deploy/kubernetes give a worker its model's timeout_s + 30 s after SIGTERM
    (tests/test_compose.py, tests/test_deploy.py): the drain's default grace is timeout_s, and
    the commit after it is bounded by the rest."""
    spec = CONFIG.models["b"].model_copy(update={"timeout_s": 120})
    grace = drain_grace_s(Settings(drain_grace_s=None), spec)
    assert grace + COMMIT_S == 120 + COMMIT_AND_CLOSE_S
    assert drain_grace_s(Settings(drain_grace_s=40), spec) == 40
