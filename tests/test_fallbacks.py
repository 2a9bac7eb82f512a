"""Fallbacks end to end: a failing, hanging or cooled-down model hands its work down the
route's chain, a prompt too long or a queue too deep moves it at submit, and each request
records which model answered and why it left the others. Also the breaker and queue depth
on Redis, and interactive requests overtaking batch work on a busy model."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.enums import Outcome, Priority, RequestStatus
from core.settings import Settings
from inferq.client import Client, RequestFailed
from router.config import BreakerSpec, RouterConfig, load_config
from router.route import Route
from storage.tables import LedgerEntry, Request
from submission.prepare import availability
from tasks.app import create_celery, publish_runs
from tasks.breaker import Breaker
from tasks.contract import RunMessage
from tasks.queues import model_queue, queue_depths
from tests.conftest import queued_runs, stop, wait_for
from tests.stack import own_settings, start_api, start_workers
from workers.engines.scripted import Rule, ScriptedEngine
from workers.runtime import WorkerRuntime

CONFIG = {
    "models": {
        "flaky": {
            "engine": "scripted",
            "max_batch_size": 8,
            "batch_window_ms": 20,
            "timeout_s": 2,
            "options": {
                "rules": [
                    {"match": "BOOM", "fail": "engine exploded"},
                    {"match": "STUCK", "delay_s": 3},  # past the 2 s timeout
                ]
            },
        },
        # One request a batch, and slow on SLOW: a busy model for the priority test.
        "steady": {
            "engine": "scripted",
            "max_batch_size": 1,
            "batch_window_ms": 0,
            "options": {"rules": [{"match": "SLOW", "delay_s": 0.25}]},
        },
        "short": {"engine": "scripted", "max_model_len": 48},  # no worker: only ever skipped
        "idle": {"engine": "scripted"},  # no worker: its queue only grows
    },
    "routes": [
        {"task": "classify", "model": "short", "fallbacks": ["steady"]},
        {"task": "expand", "model": "idle", "fallbacks": ["steady"], "max_queue_depth": 0},
        {"task": "*", "model": "flaky", "fallbacks": ["steady"]},
    ],
    "breaker": {"failures": 3, "cooldown_s": 600},
}
MODELS = list(CONFIG["models"])


@pytest.fixture(scope="module")
def stack(
    settings: Settings, log_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, str]]:
    from weights.tiny import ensure_tiny_model

    ensure_tiny_model(settings.model_cache)
    path = tmp_path_factory.mktemp("fallbacks") / "models.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    own = own_settings(settings, path)
    workers = start_workers(own, log_dir, ["flaky", "steady"], tag="fallbacks")
    api, url = start_api(own, log_dir, "fallbacks-api")
    yield own, url
    for process in (api, *workers.values()):
        stop(process)


@pytest.fixture
def health(stack: tuple[Settings, str]) -> Iterator[Breaker]:
    """The breaker state the API and the workers share; every test starts with all closed."""
    own, _ = stack
    breaker = Breaker.create(own, load_config(own.config).breaker)
    for model in MODELS:
        breaker.reset(model)
    yield breaker
    breaker.close()


@pytest.fixture
def depth(stack: tuple[Settings, str]) -> Iterator[Callable[[str], int]]:
    """Messages waiting on a model's queues, as routing counts them."""
    own, _ = stack
    celery = create_celery(own, load_config(own.config))
    yield lambda model: queue_depths(celery, [model])[model]
    celery.close()


@pytest.fixture
def inferq(stack: tuple[Settings, str], api_key: str) -> Iterator[Client]:
    with Client(stack[1], api_key, timeout_s=60) as client:
        yield client


def chat(text: str) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": text}]}


def ledger(sessions: sessionmaker[Session], request_id: str) -> list[tuple[str, Outcome]]:
    with sessions() as session:
        rows = session.execute(
            select(LedgerEntry.model, LedgerEntry.outcome)
            .where(LedgerEntry.request_id == uuid.UUID(request_id))
            .order_by(LedgerEntry.id)
        )
        return [(model, outcome) for model, outcome in rows]


def test_a_failing_engine_hands_the_request_down_the_chain(
    inferq: Client, health: Breaker, sessions: sessionmaker[Session]
) -> None:
    fine = inferq.generate("chat", chat("hello there"))
    assert (fine.model, fine.first_model, fine.fallback_reason) == ("flaky", "flaky", None)
    fell = inferq.generate("chat", chat("BOOM goes the model"))
    assert (fell.model, fell.first_model) == ("steady", "flaky")
    assert fell.fallback_reason == "flaky failed: EngineError: engine exploded"
    assert fell.text == "echo BOOM goes the model" and fell.usage is not None
    assert ledger(sessions, fell.id) == [("flaky", Outcome.FAILED), ("steady", Outcome.SUCCEEDED)]
    assert not health.cooled("flaky")  # one failure is not a pattern


def test_an_engine_call_past_the_timeout_falls_back(
    inferq: Client, health: Breaker, sessions: sessionmaker[Session]
) -> None:
    result = inferq.generate("chat", chat("STUCK for a while"))
    assert (result.model, result.first_model) == ("steady", "flaky")
    assert result.fallback_reason == "flaky timed out: EngineTimeout: no answer within 2s"
    assert ledger(sessions, result.id) == [
        ("flaky", Outcome.TIMED_OUT),
        ("steady", Outcome.SUCCEEDED),
    ]
    # The abandoned call ends on its own; the model answers again once it has.
    assert inferq.generate("chat", chat("still there?")).model == "flaky"


def test_with_no_fallback_left_the_request_fails(inferq: Client, health: Breaker) -> None:
    with pytest.raises(RequestFailed) as info:
        inferq.generate("chat", chat("BOOM alone"), model="flaky")  # an override has no chain
    failed = info.value.result
    assert (failed.status, failed.model, failed.fallback_reason) == ("failed", "flaky", None)
    assert failed.error == "EngineError: engine exploded" and failed.text is None


def test_a_model_that_keeps_failing_is_cooled_down_and_skipped(
    inferq: Client, health: Breaker, sessions: sessionmaker[Session]
) -> None:
    ids = [inferq.submit("chat", chat(f"BOOM {n}")) for n in range(3)]
    for request_id in ids:
        assert inferq.wait(request_id, timeout_s=120).model == "steady"
    wait_for(lambda: health.cooled("flaky"), timeout=60, what="flaky to cool down")
    skipped = inferq.generate("chat", chat("a healthy request"))
    assert (skipped.model, skipped.first_model) == ("steady", "flaky")
    assert skipped.fallback_reason == "flaky: cooling down after repeated failures"
    assert ledger(sessions, skipped.id) == [("steady", Outcome.SUCCEEDED)]  # flaky never ran it
    health.reset("flaky")
    assert inferq.generate("chat", chat("a healthy request")).model == "flaky"


def test_a_prompt_too_long_for_the_model_moves_to_a_longer_context(inferq: Client) -> None:
    labels = ["shoes", "bags"]
    result = inferq.generate("classify", {"text": "red leather boots " * 20, "labels": labels})
    assert (result.model, result.first_model, result.text) == ("steady", "short", "shoes")
    reason = r"short: prompt of \d+ tokens \+ max_tokens 16 exceeds its context of 48"
    assert re.fullmatch(reason, result.fallback_reason or "")


def test_a_queue_deeper_than_the_route_allows_moves_down_the_chain(
    inferq: Client, health: Breaker, depth: Callable[[str], int]
) -> None:
    before = depth("idle")
    parked = inferq.submit("expand", {"query": "boots", "n": 1})
    wait_for(lambda: depth("idle") > before, timeout=30, what="idle's queue")
    if before == 0:
        first = inferq.get(parked)
        assert (first.status, first.model) == ("queued", "idle")
    moved = inferq.generate("expand", {"query": "boots", "n": 1})
    assert (moved.model, moved.first_model) == ("steady", "idle")
    assert moved.fallback_reason == f"idle: queue depth {depth('idle')} over the route's 0"


def test_breaker_counts_failures_in_a_row_and_a_success_resets(
    settings: Settings,
) -> None:
    health = Breaker.create(settings, BreakerSpec(failures=3, cooldown_s=0.2))
    model = f"m-{uuid.uuid4().hex[:6]}"
    try:
        assert not health.record(model, succeeded=0, failed=2)
        assert not health.record(model, succeeded=1, failed=1)  # a success: the count restarts
        assert not health.record(model, succeeded=0, failed=2) and not health.cooled(model)
        assert health.record(model, succeeded=0, failed=1) and health.cooled(model)
        wait_for(lambda: not health.cooled(model), timeout=30, what="the cool-down to end")
    finally:
        health.reset(model)
        health.close()


def test_queue_depth_counts_every_priority_under_the_key_prefix(
    settings: Settings, sessions: sessionmaker[Session], tenant_id: uuid.UUID
) -> None:
    model = f"depth-{uuid.uuid4().hex[:6]}"  # a queue of its own, removed at the end
    config = RouterConfig.model_validate(
        {"models": {model: {"engine": "scripted", "max_batch_size": 1}}, "routes": []}
    )
    celery = create_celery(settings, config)
    elsewhere = settings.model_copy(update={"broker_key_prefix": f"elsewhere-{model}:"})
    other = create_celery(elsewhere, config)
    try:
        assert queue_depths(celery, [model]) == {model: 0}
        messages = [
            *queued_runs(sessions, tenant_id, ["x"], model=model, priority=Priority.INTERACTIVE),
            *queued_runs(sessions, tenant_id, ["y", "z"], model=model),
        ]
        publish_runs(celery, config, messages)  # a bundle of one request each
        assert queue_depths(celery, [model]) == {model: 3}  # every priority list counted
        assert queue_depths(other, [model]) == {model: 0}  # another prefix sees none of them
    finally:
        client = redis.Redis.from_url(settings.broker_url)
        for key in client.scan_iter(f"{settings.broker_key_prefix}{model_queue(model)}*"):
            client.delete(key)
        client.close()
        celery.close()
        other.close()


def test_interactive_requests_overtake_batch_work_on_a_busy_model(
    inferq: Client, sessions: sessionmaker[Session]
) -> None:
    slow = chat("SLOW batch work")  # 0.25 s a request, one request a batch
    with ThreadPoolExecutor(8) as pool:
        batch = list(
            pool.map(
                lambda _: inferq.submit("chat", slow, model="steady", priority="batch"), range(40)
            )
        )
    wait_for(lambda: inferq.get(batch[0]).done, timeout=120, what="the batch work to start")
    urgent = inferq.generate("chat", chat("SLOW and urgent"), model="steady", timeout_s=300)
    for request_id in batch:
        assert inferq.wait(request_id, timeout_s=300).status == "succeeded"
    with sessions() as session:
        rows = session.execute(
            select(Request.id, Request.created_at, Request.finished_at).where(
                Request.id.in_([uuid.UUID(i) for i in [*batch, urgent.id]])
            )
        ).all()
    times = {str(request_id): (created, finished) for request_id, created, finished in rows}
    urgent_created, urgent_finished = times.pop(urgent.id)
    waiting = sum(finished > urgent_created for _, finished in times.values())
    overtaken = sum(finished > urgent_finished for _, finished in times.values())
    assert waiting >= 10, f"the model was not busy: {waiting} batch requests left"
    # The interactive request waits only for what the worker already holds (one batch
    # running, one buffered), not for the batch work still queued.
    assert overtaken >= waiting - 3, f"{overtaken} of {waiting} waiting were overtaken"


WEDGED = RouterConfig.model_validate(
    {
        "models": {
            "w": {"engine": "scripted", "batch_window_ms": 200, "timeout_s": 0.5},
            "next": {"engine": "scripted"},
        },
        "routes": [{"task": "*", "model": "w", "fallbacks": ["next"]}],
    }
)


def test_a_wedged_engine_times_out_what_follows_and_hands_it_on(
    make_runtime: Callable[..., WorkerRuntime],
    sessions: sessionmaker[Session],
    tenant_id: uuid.UUID,
) -> None:
    prompts = ["HANG here", "an innocent one", "and another"]
    messages = queued_runs(
        sessions, tenant_id, prompts, model="w", max_tokens=4, first_model="w", fallbacks=["next"]
    )
    sent: list[RunMessage] = []
    engine = ScriptedEngine(rules=[Rule(match="HANG", hang=True)])
    runtime = make_runtime(
        engine, config=WEDGED, model="w", worker_name="wedged", publish_runs=sent.extend
    )
    assert runtime.submit(messages[0]).result(timeout=60) is Outcome.FAILED
    # The next batch finds the engine still busy: it times out whole, never split.
    later = [runtime.submit(m) for m in messages[1:]]
    assert [f.result(timeout=60) for f in later] == [Outcome.FAILED] * 2
    assert engine.calls == [1]  # no second call ever ran beside the hung one
    with sessions() as session:
        found = {
            str(r.id): r
            for r in session.scalars(select(Request).where(Request.tenant_id == tenant_id))
        }
        outcomes = set(
            session.scalars(select(LedgerEntry.outcome).where(LedgerEntry.tenant_id == tenant_id))
        )
    reasons = [
        "w timed out: EngineTimeout: no answer within 0.5s",
        "w timed out: EngineTimeout: engine still busy past 0.5s",
        "w timed out: EngineTimeout: engine still busy past 0.5s",
    ]
    for message, reason in zip(messages, reasons, strict=True):
        row = found[message.request_id]
        assert (row.status, row.model, row.first_model) == (RequestStatus.QUEUED, "next", "w")
        assert (row.fallbacks, row.fallback_reason, row.attempts) == (None, reason, 1)
    assert outcomes == {Outcome.TIMED_OUT}
    assert [(m.request_id, m.model, m.fallbacks) for m in sent] == [
        (m.request_id, "next", None) for m in messages
    ]


def test_without_redis_routing_goes_on_as_configured(settings: Settings) -> None:
    gone = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})  # nothing there
    config = load_config(settings.config)
    breaker, celery = Breaker.create(gone, BreakerSpec()), create_celery(gone, config)
    chosen = Route("flaky", ("steady",), 0.5, max_queue_depth=3)
    assert (
        availability(breaker, celery)(chosen) is None
    )  # neither cooled nor too deep, as far as it knows
    breaker.close()
    celery.close()
