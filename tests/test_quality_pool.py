"""The evaluation pool against the real Postgres: share, reservoir window, PII, transactions."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from core.enums import Priority, RequestStatus, TaskKind
from core.settings import Settings
from quality.pii import PiiStripper, build_stripper
from quality.pool import (
    PoolPolicy,
    PoolSampler,
    reservoir_slot,
    sample_succeeded,
    unit_hash,
)
from router.config import RouterConfig
from storage.eval_tables import EvalCounter, EvalPoolItem
from storage.tables import Request
from tests.conftest import queued_runs
from workers.runtime import WorkerRuntime


@dataclass(frozen=True)
class Done:
    request_id: uuid.UUID
    tenant_id: uuid.UUID
    task: TaskKind
    output: Any


@pytest.fixture(scope="module")
def stripper() -> PiiStripper:
    return build_stripper()


@pytest.fixture
def clean_pool(sessions: sessionmaker[Session]) -> Iterator[None]:
    """The pool is global per task kind: each test starts and ends with it empty."""

    def wipe() -> None:
        with sessions.begin() as session:
            session.execute(delete(EvalPoolItem))
            session.execute(delete(EvalCounter))

    wipe()
    yield
    wipe()


def make_requests(
    sessions: sessionmaker[Session], tenant_id: uuid.UUID, count: int, *, task: TaskKind
) -> list[Done]:
    """Succeeded request rows (the hook reads their input) and their finished attempts."""
    done = []
    with sessions.begin() as session:
        for i in range(count):
            row = Request(
                tenant_id=tenant_id,
                task=task,
                status=RequestStatus.SUCCEEDED,
                priority=Priority.BATCH,
                model="tiny",
                input={"text": f"item {i}: navy hoodie, size M"},
                params={},
                output={"colour": "navy", "size": "M"},
            )
            session.add(row)
            session.flush()
            done.append(Done(row.id, tenant_id, task, row.output))
    return done


def feed(
    sessions: sessionmaker[Session],
    rows: list[Done],
    *,
    policy: PoolPolicy,
    stripper: PiiStripper,
    rng: random.Random,
    batch: int = 7,
) -> list[int]:
    """Offer rows batch by batch, one transaction each, as the batch writer does."""
    sizes = []
    for start in range(0, len(rows), batch):
        with sessions.begin() as session:
            sample_succeeded(
                session, rows[start : start + batch], policy=policy, stripper=stripper, rng=rng
            )
        sizes.append(pool_size(sessions, rows[0].task))
    return sizes


def pool_size(sessions: sessionmaker[Session], task: TaskKind) -> int:
    with sessions() as session:
        return (
            session.scalar(
                select(func.count()).select_from(EvalPoolItem).where(EvalPoolItem.task == task)
            )
            or 0
        )


def pooled_ids(sessions: sessionmaker[Session], task: TaskKind) -> list[uuid.UUID]:
    with sessions() as session:
        return list(
            session.scalars(
                select(EvalPoolItem.request_id)
                .where(EvalPoolItem.task == task)
                .order_by(EvalPoolItem.slot)
            )
        )


EVERYONE = PoolPolicy(share=1.0, window=10, tenants=frozenset({"*"}))


@pytest.mark.usefixtures("clean_pool")
def test_window_never_exceeds_n_and_later_items_enter(
    sessions: sessionmaker[Session], tenant_id: uuid.UUID, stripper: PiiStripper
) -> None:
    rows = make_requests(sessions, tenant_id, 200, task=TaskKind.EXTRACT)
    sizes = feed(sessions, rows, policy=EVERYONE, stripper=stripper, rng=random.Random(3))

    assert max(sizes) == 10
    assert sizes[0] == 7  # the first batch fills slots 0..6 directly
    with sessions() as session:
        seen = session.scalar(select(EvalCounter.seen).where(EvalCounter.task == TaskKind.EXTRACT))
        slots = session.scalars(select(EvalPoolItem.slot)).all()
    assert seen == 200
    assert sorted(slots) == list(range(10))
    order = {row.request_id: i for i, row in enumerate(rows)}
    positions = sorted(order[rid] for rid in pooled_ids(sessions, TaskKind.EXTRACT))
    assert positions[-1] >= 100, f"no item of the second half entered: {positions}"
    assert positions != list(range(10)), "the pool never moved past the first window"


@pytest.mark.usefixtures("clean_pool")
def test_same_seed_same_pool(
    sessions: sessionmaker[Session], tenant_id: uuid.UUID, stripper: PiiStripper
) -> None:
    rows = make_requests(sessions, tenant_id, 60, task=TaskKind.CLASSIFY)
    feed(sessions, rows, policy=EVERYONE, stripper=stripper, rng=random.Random(11))
    first = pooled_ids(sessions, TaskKind.CLASSIFY)
    with sessions.begin() as session:
        session.execute(delete(EvalPoolItem))
        session.execute(delete(EvalCounter))
    feed(sessions, rows, policy=EVERYONE, stripper=stripper, rng=random.Random(11))
    assert pooled_ids(sessions, TaskKind.CLASSIFY) == first
    assert len(first) == 10


def test_reservoir_slot_is_algorithm_r() -> None:
    rng = random.Random(5)
    assert [reservoir_slot(k, 3, rng) for k in (1, 2, 3)] == [0, 1, 2]
    kept = [reservoir_slot(k, 3, random.Random(k)) for k in range(4, 4000)]
    share_kept = sum(s is not None for s in kept[-1000:]) / 1000
    assert all(s is None or 0 <= s < 3 for s in kept)
    # Item k is kept with probability 3/k: about 0.1% here, never all, rarely many.
    assert 0 < share_kept < 0.01


@pytest.mark.usefixtures("clean_pool")
def test_share_tenants_and_task_overrides(
    sessions: sessionmaker[Session], tenant_id: uuid.UUID, stripper: PiiStripper
) -> None:
    rows = make_requests(sessions, tenant_id, 80, task=TaskKind.EXPAND)
    half = PoolPolicy(share=0.5, window=1000, tenants=frozenset({str(tenant_id)}))
    feed(sessions, rows, policy=half, stripper=stripper, rng=random.Random(0))
    expected = {r.request_id for r in rows if unit_hash(r.request_id) < 0.5}
    assert set(pooled_ids(sessions, TaskKind.EXPAND)) == expected
    assert 0 < len(expected) < 80

    other_tenant = PoolPolicy(share=1.0, window=1000, tenants=frozenset({str(uuid.uuid4())}))
    chat = make_requests(sessions, tenant_id, 5, task=TaskKind.CHAT)
    feed(sessions, chat, policy=other_tenant, stripper=stripper, rng=random.Random(0))
    assert pool_size(sessions, TaskKind.CHAT) == 0

    chat_off = PoolPolicy(share=1.0, task_shares={"chat": 0.0}, tenants=frozenset({"*"}))
    feed(sessions, chat, policy=chat_off, stripper=stripper, rng=random.Random(0))
    assert pool_size(sessions, TaskKind.CHAT) == 0


def test_policy_from_settings() -> None:
    settings = Settings(
        eval_sample_share=0.2, eval_task_shares={"extract": 0.9}, eval_window=50, eval_tenants=["*"]
    )
    policy = PoolPolicy.from_settings(settings)
    assert policy.enabled and policy.window == 50
    assert policy.share_for(TaskKind.EXTRACT) == 0.9
    assert policy.share_for(TaskKind.CHAT) == 0.2
    assert not PoolPolicy.from_settings(Settings()).enabled


@pytest.mark.usefixtures("clean_pool")
def test_raw_pii_never_reaches_the_pool(
    sessions: sessionmaker[Session], tenant_id: uuid.UUID, stripper: PiiStripper
) -> None:
    with sessions.begin() as session:
        row = Request(
            tenant_id=tenant_id,
            task=TaskKind.CHAT,
            status=RequestStatus.SUCCEEDED,
            priority=Priority.INTERACTIVE,
            model="tiny",
            input={
                "messages": [{"role": "user", "content": "I'm ann@example.org, +44 20 7946 0958"}]
            },
            params={},
            output="Card 4111 1111 1111 1111 noted for ann@example.org.",
        )
        session.add(row)
        session.flush()
        done = Done(row.id, tenant_id, TaskKind.CHAT, row.output)
    with sessions.begin() as session:
        sample_succeeded(session, [done], policy=EVERYONE, stripper=stripper, rng=random.Random(0))
    with sessions() as session:
        item = session.scalars(select(EvalPoolItem)).one()
        raw = session.execute(
            text("SELECT input::text || output::text FROM eval_pool WHERE id = :id"),
            {"id": item.id},
        ).scalar_one()
    assert item.input == {"messages": [{"role": "user", "content": "I'm <EMAIL>, <PHONE>"}]}
    assert item.output == "Card <CARD> noted for <EMAIL>."
    assert item.pii_counts == {"email": 2, "phone": 1, "card": 1}
    for secret in ("ann@example.org", "7946", "4111"):
        assert secret not in raw


@pytest.mark.usefixtures("clean_pool")
def test_rolled_back_transaction_leaves_no_trace(
    sessions: sessionmaker[Session], tenant_id: uuid.UUID, stripper: PiiStripper
) -> None:
    rows = make_requests(sessions, tenant_id, 3, task=TaskKind.COMPLETE)
    with sessions() as session:
        slots = sample_succeeded(
            session, rows, policy=EVERYONE, stripper=stripper, rng=random.Random(0)
        )
        session.rollback()
    assert slots == [0, 1, 2]
    assert pool_size(sessions, TaskKind.COMPLETE) == 0
    with sessions() as session:
        assert session.get(EvalCounter, TaskKind.COMPLETE) is None


@pytest.mark.usefixtures("clean_pool")
def test_sampler_from_settings(sessions: sessionmaker[Session], tenant_id: uuid.UUID) -> None:
    assert PoolSampler.from_settings(Settings(eval_sample_share=1.0)) is None  # no tenants
    settings = Settings(eval_sample_share=1.0, eval_window=5, eval_tenants=[str(tenant_id)])
    sampler = PoolSampler.from_settings(settings)
    assert sampler is not None
    rows = make_requests(sessions, tenant_id, 8, task=TaskKind.EXTRACT)
    with sessions.begin() as session:
        slots = sampler.sample(session, rows)
    assert slots[:5] == [0, 1, 2, 3, 4]
    assert all(0 <= slot < 5 for slot in slots)
    assert pool_size(sessions, TaskKind.EXTRACT) == 5


def test_worker_samples_succeeded_requests_into_the_pool_as_it_commits(
    settings: Settings, sessions: sessionmaker[Session], tenant_id: uuid.UUID, clean_pool: None
) -> None:
    """The real worker wiring: WorkerRuntime.create adds the sampler to the writer's commit."""
    config = RouterConfig.model_validate(
        {
            "models": {"s": {"engine": "scripted", "path": "builtin:tiny"}},
            "routes": [{"task": "*", "model": "s"}],
        }
    )
    sampling = settings.model_copy(update={"eval_sample_share": 1.0, "eval_tenants": ["*"]})
    runtime = WorkerRuntime.create(sampling, config, "s", sessions, Celery(set_as_current=False))
    texts = ["mail me at jane.doe@example.com", "a plain product line"]
    messages = queued_runs(sessions, tenant_id, texts, model="s")
    ids = [uuid.UUID(m.request_id) for m in messages]
    runtime.start()
    try:
        [runtime.submit(m).result(timeout=60) for m in messages]
    finally:
        runtime.stop()
    with sessions() as session:
        pooled = session.scalars(select(EvalPoolItem).where(EvalPoolItem.request_id.in_(ids)))
        inputs = sorted(str(item.input) for item in pooled)
    assert len(inputs) == 2
    assert "jane.doe@example.com" not in " ".join(inputs)
    assert any("<EMAIL>" in text for text in inputs)
