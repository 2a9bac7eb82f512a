"""Canary routes: the split by request id, the arm on the request row, both arms compared,
decisions that the API and workers follow without a restart, and the automatic policy.

Two scripted models stand for the control and the candidate (the candidate cheaper per
GPU-hour and quicker), served by in-process runtimes; the API is the real app in process.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from concurrent.futures import wait
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from core.enums import Priority, TaskKind
from core.settings import Settings
from inferq.cli import main
from quality.canary import CanaryError, canary_status, decide, run_policy
from router import (
    ConfigError,
    Decision,
    RouterConfig,
    Verdict,
    apply_decisions,
    arm_of,
    load_config,
    route,
)
from storage.canary import CanaryDecision
from storage.eval_tables import EvalRun, EvalRunItem, EvalRunStatus
from storage.tables import Request
from storage.webhooks import WebhookDelivery
from submission.live_config import LiveConfig
from submission.prepare import Prepared, prepare_many
from submission.request import CreateRequest
from submission.services import Services, build_services
from submission.submit import submit_many
from tasks.rows import run_message
from tests.conftest import new_tenant, service_env, wait_for
from tests.stack import own_settings
from workers.engines.scripted import ScriptedEngine

CONTROL, CANDIDATE = "canary-control", "canary-cand"
ROUTES = ("labels", "fields", "any-2")
HOOK = "http://127.0.0.1:9/canary-hook"  # nothing listens; the delivery row is what is checked
SCRIPTED = {"engine": "scripted", "path": "builtin:tiny", "max_batch_size": 16}
LABELS = {"text": "a red mug, in stock", "labels": ["in stock", "sold out"]}


def config_doc() -> dict[str, Any]:
    auto = {"min_successes": 5, "window_s": 3600}
    return {
        "models": {
            CONTROL: {**SCRIPTED, "price_per_gpu_hour": 4.0, "options": {"delay_ms": 30}},
            CANDIDATE: {**SCRIPTED, "price_per_gpu_hour": 0.5, "options": {"delay_ms": 10}},
            "canary-short": {**SCRIPTED, "max_model_len": 128},
        },
        "routes": [
            {
                "task": "classify",
                "name": "labels",
                "model": CONTROL,
                "canary": {"model": CANDIDATE, "share": 0.5, "auto": auto},
            },
            {
                "task": "extract",
                "name": "fields",
                "model": CONTROL,
                "canary": {"model": CANDIDATE, "share": 0.5, "auto": auto},
            },
            {"task": "*", "model": CONTROL, "canary": {"model": CANDIDATE, "share": 0.3}},
        ],
    }


@pytest.fixture
def canary_settings(
    settings: Settings, tmp_path: Path, sessions: sessionmaker[Session]
) -> Iterator[Settings]:
    """Its own config file; decisions, eval runs and requests of these routes wiped."""
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(config_doc()))

    def wipe() -> None:
        with sessions.begin() as session:
            session.execute(delete(CanaryDecision))
            session.execute(delete(EvalRun).where(EvalRun.candidate.in_([CONTROL, CANDIDATE])))
            session.execute(delete(Request).where(Request.canary_route.in_(ROUTES)))

    wipe()
    yield own_settings(settings, path).model_copy(
        update={"config_poll_s": 0.2, "reconciler": False, "canary_webhook_url": HOOK}
    )
    wipe()


@pytest.fixture
def services(canary_settings: Settings) -> Iterator[Services]:
    built = build_services(canary_settings)
    yield built
    built.dispose()


def test_the_split_is_deterministic_per_id_near_its_share_and_independent_per_route() -> None:
    config = RouterConfig.model_validate(config_doc())
    ids = [str(uuid.UUID(int=i * 7919 + 1)) for i in range(2000)]

    def routed(request_id: str) -> Any:
        return route(
            TaskKind.COMPLETE, {"prompt": "hi"}, tenant="t", config=config, request_id=request_id
        )

    chosen = [routed(i) for i in ids]
    candidates = [r for r in chosen if r.canary_arm == "candidate"]
    # 30 % of 2,000: 600, binomial sd 20.5; 3.5 sd either side.
    assert 528 <= len(candidates) <= 672
    assert all(r.canary_route == "any-2" for r in chosen)
    assert {(r.model, r.canary_arm) for r in chosen} == {
        (CONTROL, "control"),
        (CANDIDATE, "candidate"),
    }
    assert [routed(i).canary_arm for i in ids[:200]] == [r.canary_arm for r in chosen[:200]]
    assert all(r.canary_arm == arm_of(i, "any-2", 0.3) for i, r in zip(ids, chosen, strict=True))
    same = sum(arm_of(i, "labels", 0.5) == arm_of(i, "fields", 0.5) for i in ids)
    assert 850 <= same <= 1150  # routes split independently of each other
    assert all(arm_of(i, "x", 0.0) == "control" and arm_of(i, "x", 1.0) == "candidate" for i in ids)
    named = route(
        TaskKind.COMPLETE,
        {"prompt": "hi"},
        tenant="t",
        config=config,
        model_override=CANDIDATE,
        request_id=ids[0],
    )
    assert named.canary_arm is None  # a model the caller names is no arm of the canary


@pytest.mark.parametrize(
    ("canary", "message"),
    [
        ({"model": "nope", "share": 0.1}, "routes.2.canary.model: unknown model 'nope'"),
        ({"model": CANDIDATE, "share": 1.5}, "routes.2.canary.share: must be between 0 and 1"),
        ({"model": CANDIDATE, "share": -0.1}, "routes.2.canary.share: must be between 0 and 1"),
        (
            {"model": "canary-short", "share": 0.1},
            "routes.2.canary.model: candidate 'canary-short' has max_model_len 128, shorter "
            "than the 512 tokens the route admits",
        ),
    ],
)
def test_bad_canaries_are_refused_when_the_config_loads(
    tmp_path: Path, canary: dict[str, Any], message: str
) -> None:
    doc = config_doc()
    doc["routes"][2]["canary"] = canary
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_route_names_are_unique(tmp_path: Path) -> None:
    doc = config_doc()
    doc["routes"][1]["name"] = "labels"
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"routes\.1\.name: 'labels' names two routes"):
        load_config(path)


def test_decisions_overlay_the_file() -> None:
    config = RouterConfig.model_validate(config_doc())
    promoted = apply_decisions(config, [Decision("labels", CANDIDATE, Verdict.PROMOTE)])
    assert (promoted.routes[0].model, promoted.routes[0].canary) == (CANDIDATE, None)
    aborted = apply_decisions(config, [Decision("fields", CANDIDATE, Verdict.ABORT)])
    assert (aborted.routes[1].model, aborted.routes[1].canary) == (CONTROL, None)
    stale = apply_decisions(config, [Decision("labels", "another", Verdict.PROMOTE)])
    assert stale == config  # made on a candidate the route no longer names


def _eval_run(
    sessions: sessionmaker[Session], model: str, task: TaskKind, value: float, half: float
) -> None:
    with sessions.begin() as session:
        run = EvalRun(
            candidate=model,
            reference="pool",
            task=task,
            status=EvalRunStatus.SUCCEEDED,
            scores={"metric": "accuracy", "value": value},
            n=60,
            ci_low=value - half,
            ci_high=value + half,
        )
        session.add(run)
        session.flush()
        for n in range(3):  # the same pool items for both arms
            session.add(EvalRunItem(run_id=run.id, request_id=uuid.UUID(int=n + 1), score=1.0))


def _served(services: Services, bodies: list[CreateRequest]) -> list[Request]:
    """Submit as the API does, run each request on its arm's model in process, read rows."""
    tenant = new_tenant(services.sessions, "canary")
    prepared = [p for p in prepare_many(services, tenant.id, bodies) if isinstance(p, Prepared)]
    rows = [row for row, _ in submit_many(services, prepared)]
    engines = {CONTROL: 30, CANDIDATE: 10}
    from workers.runtime import WorkerRuntime

    runtimes = {
        model: WorkerRuntime(
            ScriptedEngine.from_options({"delay_ms": delay}),
            model=model,
            config=services.config,
            sessions=services.sessions,
            worker_name=f"test-{model}",
            publish_deliveries=lambda ids: None,
        )
        for model, delay in engines.items()
    }
    for runtime in runtimes.values():
        runtime.start()
    try:
        futures = [runtimes[row.model].submit(run_message(row)) for row in rows]
        done, _ = wait(futures, timeout=60)
        assert len(done) == len(rows)
    finally:
        for runtime in runtimes.values():
            runtime.stop()
    with services.sessions() as session:
        return list(session.scalars(select(Request).where(Request.id.in_([r.id for r in rows]))))


def test_status_compares_the_arms_and_the_policy_decides_both_ways(
    services: Services, canary_settings: Settings, sessions: sessionmaker[Session]
) -> None:
    body = CreateRequest(task=TaskKind.CLASSIFY, input=LABELS, priority=Priority.BATCH)
    rows = _served(services, [body] * 40)
    assert {row.canary_route for row in rows} == {"labels"}
    assert all(row.canary_arm == arm_of(str(row.id), "labels", 0.5) for row in rows)
    assert all(
        row.model == (CANDIDATE if row.canary_arm == "candidate" else CONTROL) for row in rows
    )

    with pytest.raises(CanaryError, match="no evaluation results on classify"):
        decide(services, "labels", Verdict.PROMOTE)
    _eval_run(sessions, CONTROL, TaskKind.CLASSIFY, 0.80, 0.08)
    _eval_run(sessions, CANDIDATE, TaskKind.CLASSIFY, 0.79, 0.08)  # not worse beyond 0.02
    _eval_run(sessions, CONTROL, TaskKind.EXTRACT, 0.80, 0.05)
    _eval_run(sessions, CANDIDATE, TaskKind.EXTRACT, 0.50, 0.05)  # a regression

    result = CliRunner().invoke(
        main,
        ["canary", "status", "labels", "--window", "1h", "--json"],
        env=service_env(canary_settings),
    )
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    control, candidate = shown["control"], shown["candidate"]
    arms = {"control": control, "candidate": candidate}
    for arm, figures in arms.items():
        taken = [row for row in rows if row.canary_arm == arm]
        assert figures["requests"] == figures["succeeded"] == len(taken) >= 5
        assert figures["failure_rate"] == figures["fallback_rate"] == 0.0
        assert figures["latency_p95_s"] >= figures["latency_p50_s"] > 0
    assert control["models"] == {CONTROL: control["requests"]}
    assert candidate["cost_per_success"] < control["cost_per_success"]
    assert (control["quality"]["value"], candidate["quality"]["value"]) == (0.80, 0.79)
    assert shown["shared_items"] == 3 and shown["regression"] is False

    status = canary_status(services, "fields", window=timedelta(hours=1))
    assert status.quality.regression is True

    decided = {row.route: row.verdict for row in run_policy(services)}
    assert decided == {"labels": "promote", "fields": "abort"}
    assert run_policy(services) == []  # decided once
    with sessions() as session:
        events = session.scalars(
            select(WebhookDelivery.event_type).where(WebhookDelivery.event_type.like("canary.%"))
        ).all()
    assert sorted(events) == ["canary.aborted", "canary.promoted"]
    live = LiveConfig(canary_settings.config, sessions, poll_s=60)
    assert (live.current().routes[0].model, live.current().routes[1].canary) == (CANDIDATE, None)


def test_a_running_api_follows_decisions_without_a_restart(
    canary_settings: Settings, sessions: sessionmaker[Session]
) -> None:
    tenant = new_tenant(sessions, "canary-api")
    app = create_app(canary_settings)
    with TestClient(app) as client:
        services: Services = app.state.services

        def post(task: str, payload: dict[str, Any]) -> Request:
            answer = client.post(
                "/v1/requests", headers=tenant.headers, json={"task": task, "input": payload}
            )
            assert answer.status_code == 202, answer.text
            with sessions() as session:
                return session.get_one(Request, uuid.UUID(answer.json()["id"]))

        first = [post("complete", {"prompt": f"hello {n}"}) for n in range(20)]
        assert all(r.canary_route == "any-2" for r in first)
        assert all(r.canary_arm == arm_of(str(r.id), "any-2", 0.3) for r in first)
        runner = CliRunner()
        env = service_env(canary_settings)
        refused = runner.invoke(main, ["canary", "promote", "any-2"], env=env)
        assert refused.exit_code == 1
        assert (
            "cannot promote 'canary-cand' on route 'any-2': it has no evaluation results"
            in refused.output
        )

        _eval_run(sessions, CANDIDATE, TaskKind.EXTRACT, 0.8, 0.05)
        assert runner.invoke(main, ["canary", "promote", "any-2"], env=env).exit_code == 0
        assert runner.invoke(main, ["canary", "abort", "labels"], env=env).exit_code == 0
        wait_for(
            lambda: (
                services.config.routes[2].canary is None
                and services.config.routes[0].canary is None
            ),
            timeout=30,
            what="the API to apply the decisions",
        )
        after = [post("complete", {"prompt": f"hi {n}"}) for n in range(5)]
        assert {(r.model, r.canary_arm) for r in after} == {(CANDIDATE, None)}
        assert post("classify", LABELS).model == CONTROL


def test_live_config_reloads_on_change_and_on_sighup(
    canary_settings: Settings, sessions: sessionmaker[Session]
) -> None:
    """What the workers (and the API) reload with: file edits, decisions, SIGHUP."""
    path = canary_settings.config
    seen: list[RouterConfig] = []
    live = LiveConfig(path, sessions, poll_s=60, on_change=seen.append)
    assert live.check() is False
    doc = config_doc()
    doc["routes"][2]["canary"]["share"] = 0.25
    path.write_text(yaml.safe_dump(doc))
    assert live.check() is True and live.current().routes[2].canary.share == 0.25
    with sessions.begin() as session:
        session.add(
            CanaryDecision(
                route="labels",
                candidate=CANDIDATE,
                control=CONTROL,
                verdict="abort",
                decided_by="cli",
            )
        )
    assert live.check() is True and live.current().routes[0].canary is None
    kept = live.current()
    doc["routes"][2]["canary"]["share"] = 7
    path.write_text(yaml.safe_dump(doc))
    assert live.check() is False and live.current() is kept  # a bad file leaves it in force
    doc["routes"][2]["canary"]["share"] = 0.25
    doc["models"]["extra"] = SCRIPTED
    path.write_text(yaml.safe_dump(doc))
    assert live.check() is False and live.current() is kept  # new models need a restart

    del doc["models"]["extra"]
    path.write_text(yaml.safe_dump(doc))
    live.check()
    stamp = path.stat()
    doc["routes"][2]["canary"]["share"] = 0.75  # same size, same time: only SIGHUP tells
    path.write_text(yaml.safe_dump(doc))
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert live.check() is False
    previous = signal.getsignal(signal.SIGHUP)
    live.start()
    try:
        assert live.install_sighup()
        os.kill(os.getpid(), signal.SIGHUP)
        wait_for(lambda: live.current().routes[2].canary.share == 0.75, timeout=10, what="SIGHUP")
    finally:
        live.stop()
        signal.signal(signal.SIGHUP, previous)
    assert len(seen) == 3
