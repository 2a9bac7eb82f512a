"""Within a priority, tenants share a model fairly, on a real API and a real worker (the
scripted continuous engine: one step per request, so completions interleave exactly as
slots are shared).

Both jobs are on the model's queue before its worker starts, in the order they were submitted:
the broker's queue alone would run the first job entire before the second.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.enums import Outcome, Priority, RequestStatus, TaskKind
from core.settings import Settings
from storage.tables import LedgerEntry, Request
from tasks.contract import EngineRequest, RunMessage
from tests.conftest import Process, new_tenant, stop, wait_for
from tests.stack import own_settings, start_api, start_workers
from workers.batcher import WorkItem
from workers.fairness import FairLanes

MODEL = "fair"
SPEC = {
    "engine": "scripted",
    "path": "builtin:tiny",
    "max_batch_size": 8,
    "options": {"continuous": True, "step_ms": 5},
}


@pytest.fixture(scope="module")
def stack(
    settings: Settings, log_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, str]]:
    """An API routing everything to the ``fair`` model; each test starts its worker."""
    config = tmp_path_factory.mktemp("fairness") / "models.yaml"
    routes = [{"task": "*", "model": MODEL}]
    config.write_text(yaml.safe_dump({"models": {MODEL: SPEC}, "routes": routes}))
    own = own_settings(settings, config)
    api, url = start_api(own, log_dir, "fair-api")
    yield own, url
    stop(api)


def submit_job(url: str, key: str, lines: int) -> str:
    """An inline job of one-step requests."""
    body = {
        "task": "complete",
        "params": {"max_tokens": 1},
        "items": [{"id": str(n), "prompt": f"line {n}"} for n in range(lines)],
    }
    headers = {"Authorization": f"Bearer {key}"}
    answer = httpx.post(f"{url}/v1/jobs", json=body, headers=headers, timeout=120)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def finished_count(sessions: sessionmaker[Session], job_id: str) -> int:
    with sessions() as session:
        query = select(func.count()).where(
            Request.job_id == uuid.UUID(job_id), Request.finished_at.is_not(None)
        )
        return int(session.scalar(query) or 0)


def completions(sessions: sessionmaker[Session], job_ids: list[str]) -> list[tuple[datetime, str]]:
    """When each request of the jobs finished, and its job, in completion order."""
    with sessions() as session:
        rows = session.execute(
            select(Request.finished_at, Request.job_id).where(
                Request.job_id.in_([uuid.UUID(j) for j in job_ids])
            )
        ).all()
    order = sorted((finished, str(job_id)) for finished, job_id in rows if finished is not None)
    assert len(order) == len(rows)
    return order


def run_once_each(sessions: sessionmaker[Session], job_id: str, lines: int) -> None:
    """Every request succeeded, executed exactly once: a request run ahead of its message
    was not run again when the message came."""
    with sessions() as session:
        statuses = session.execute(
            select(Request.status, func.count())
            .where(Request.job_id == uuid.UUID(job_id))
            .group_by(Request.status)
        ).all()
        attempts = session.execute(
            select(LedgerEntry.outcome, func.count())
            .join(Request, Request.id == LedgerEntry.request_id)
            .where(Request.job_id == uuid.UUID(job_id))
            .group_by(LedgerEntry.outcome)
        ).all()
    assert dict(statuses) == {RequestStatus.SUCCEEDED: lines}
    assert dict(attempts) == {Outcome.SUCCEEDED: lines}


@pytest.fixture
def worker(stack: tuple[Settings, str], log_dir: Path) -> Iterator[list[Process]]:
    """Filled by the test once its jobs are queued; stopped after it."""
    started: list[Process] = []
    yield started
    for process in started:
        stop(process)


def start_worker(stack: tuple[Settings, str], log_dir: Path, tag: str) -> Process:
    return start_workers(stack[0], log_dir, [MODEL], tag=tag)[MODEL]


def test_equal_jobs_started_together_finish_together(
    stack: tuple[Settings, str],
    log_dir: Path,
    sessions: sessionmaker[Session],
    worker: list[Process],
) -> None:
    lines = 300
    first = submit_job(stack[1], new_tenant(sessions, "fair").key, lines)
    second = submit_job(stack[1], new_tenant(sessions, "fair").key, lines)
    worker.append(start_worker(stack, log_dir, "fair-equal"))

    def done() -> bool:
        return finished_count(sessions, first) + finished_count(sessions, second) == 2 * lines

    wait_for(done, timeout=300, what="both jobs to finish")
    order = completions(sessions, [first, second])
    # Each job's last completion, as a position in the order all 600 requests finished in:
    # fair sharing has them both near the end; first come, first served puts one at half.
    last = {job: max(n for n, (_, j) in enumerate(order, 1) if j == job) for job in (first, second)}
    assert min(last.values()) >= 0.8 * max(last.values()), last
    # Halfway through, each job had about half of its requests done.
    halfway = [job for _, job in order[:lines]]
    assert abs(halfway.count(first) - halfway.count(second)) <= 0.2 * lines, (
        halfway.count(first),
        halfway.count(second),
    )
    run_once_each(sessions, first, lines)
    run_once_each(sessions, second, lines)


def test_a_small_job_behind_a_large_one_finishes_in_its_own_time(
    stack: tuple[Settings, str],
    log_dir: Path,
    sessions: sessionmaker[Session],
    worker: list[Process],
) -> None:
    large, small = 2000, 20
    large_job = submit_job(stack[1], new_tenant(sessions, "fair").key, large)
    small_job = submit_job(stack[1], new_tenant(sessions, "fair").key, small)
    worker.append(start_worker(stack, log_dir, "fair-small"))

    wait_for(
        lambda: finished_count(sessions, small_job) == small,
        timeout=300,
        what="the small job to finish",
    )
    # The small job shares the model with the large one from its start: it does not wait
    # for the 2,000 requests queued ahead of it.
    assert finished_count(sessions, large_job) <= 0.1 * large
    wait_for(
        lambda: finished_count(sessions, large_job) == large,
        timeout=300,
        what="the large job to finish",
    )
    run_once_each(sessions, small_job, small)
    run_once_each(sessions, large_job, large)


def test_free_slots_go_to_the_least_served_tenant() -> None:
    """The turns themselves: held work in fair turns, and a tenant with nothing held but
    work queued elsewhere is given slots to claim ahead."""

    def item(tenant: str, n: int) -> WorkItem:
        request = EngineRequest(prompt="x", max_tokens=1)
        return WorkItem(
            RunMessage(
                request_id=str(uuid.uuid4()),
                tenant_id=tenant,
                model=MODEL,
                task=TaskKind.COMPLETE,
                priority=Priority.BATCH,
                engine_request=request,
                enqueued_at=float(n),
            )
        )

    lanes = FairLanes()
    for n in range(10):
        lanes.push(item("big", n))
    lanes.push(item("small", 10))
    first = lanes.pick(4, waiting={"big", "small", "elsewhere"})
    assert sorted(i.message.tenant_id for i in first.items) == ["big", "big", "small"]
    assert first.ahead == {"elsewhere": 1}
    # "small" has nothing more held: the slots go to the other two in turn.
    second = lanes.pick(4, waiting={"big", "elsewhere"})
    assert [i.message.tenant_id for i in second.items] == ["big", "big"]
    assert second.ahead == {"elsewhere": 2}
    assert len(lanes) == 6
