"""No request wedges a worker: a seed the engine cannot take is refused by the API, and one
arriving on the queue without passing its checks fails alone in a real vLLM worker, which goes
on. An engine call that raises leaves the engine clean or stops the worker: an ``add`` that
raises fails only its request; a static engine call that never returns past the model's
``timeout_s`` makes the worker exit 70 (its supervisor restarts it)."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.enums import Outcome, Priority, RequestStatus, TaskKind
from core.settings import Settings
from router import load_config
from storage.tables import LedgerEntry, Request
from tasks.app import create_celery, publish_runs
from tasks.contract import RunMessage
from tasks.rows import run_message
from tests.conftest import (
    Process,
    new_tenant,
    publish_bundled,
    queued_runs,
    service_env,
    start_workers,
    stop,
    wait_for,
)
from tests.stack import own_settings

OVERFLOWING_SEED = 18446744073709551616  # 2**64: vLLM's sampler overflows, then spins


def test_the_api_refuses_an_overflowing_seed_naming_it(client: httpx.Client) -> None:
    body = {
        "task": "complete",
        "input": {"prompt": "hi"},
        "params": {"temperature": 0.8, "seed": 18446744073709551616},
    }
    response = client.post("/v1/requests", json=body)
    assert response.status_code == 422, response.text
    [issue] = response.json()["detail"]
    assert issue["loc"] == ["body", "params", "seed"]
    assert "9223372036854775807" in issue["msg"]


def test_an_overflowing_seed_on_the_queue_fails_alone_and_the_worker_goes_on(
    settings: Settings,
    sessions: sessionmaker[Session],
    workers: dict[str, Process],
    api_url: str,
) -> None:
    tenant = new_tenant(sessions, "wedge")
    key = tenant.key
    with sessions.begin() as session:
        row = Request(
            tenant_id=tenant.id,
            task=TaskKind.COMPLETE,
            status=RequestStatus.QUEUED,
            priority=Priority.BATCH,
            model="tiny",
            input={"prompt": "hi"},
            params={"temperature": 0.8},  # the message carries the seed, as an older API sent it
        )
        session.add(row)
        session.flush()
        message = run_message(row)
    message.engine_request.temperature = 0.8
    message.engine_request.seed = OVERFLOWING_SEED
    config = load_config(settings.config)
    publish_runs(create_celery(settings, config), config, [message])

    def ended() -> bool:
        with sessions() as session:
            found = session.get(Request, row.id)
            return found is not None and found.status.terminal

    wait_for(ended, timeout=120, what="the overflowing request to end")
    with sessions() as session:
        failed = session.get(Request, row.id)
        assert failed is not None
        assert failed.status is RequestStatus.FAILED
        assert "seed must be between 0 and 9223372036854775807" in (failed.error or "")
    # The worker still runs the next request.
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=api_url, headers=headers, timeout=60) as client:
        body = {"task": "complete", "input": {"prompt": "after"}, "params": {"max_tokens": 4}}
        answer = client.post("/v1/requests", json=body).json()
        done = client.get(f"/v1/requests/{answer['id']}", params={"wait": 30}).json()
    assert done["status"] == "succeeded"
    assert workers["tiny"].proc.poll() is None


# Engines that raise or never return, each in a worker of its own.
WEDGING = {
    "models": {
        "hangs": {  # static: a call past timeout_s that never returns
            "engine": "scripted",
            "max_batch_size": 4,
            "batch_window_ms": 0,
            "timeout_s": 1,
            "options": {"rules": [{"match": "HANG", "hang": True}]},
        },
        "adds": {  # continuous: add raises on ADDBOOM, after taking what came before it
            "engine": "scripted",
            "max_batch_size": 8,
            "options": {"continuous": True, "explode": {"ADDBOOM": "add blew up"}},
        },
    },
    "routes": [{"task": "*", "model": "hangs"}],
}


@pytest.fixture
def wedging(settings: Settings, tmp_path: Path) -> Settings:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(WEDGING))
    return own_settings(settings, path)


def send(settings: Settings, messages: list[RunMessage]) -> None:
    """All of them in one broker message."""
    config = load_config(settings.config)
    publish_bundled(create_celery(settings, config), config, messages, bundle=len(messages))


def statuses(sessions: sessionmaker[Session], messages: list[RunMessage]) -> list[Request]:
    ids = [uuid.UUID(m.request_id) for m in messages]
    with sessions() as session:
        found = {r.id: r for r in session.scalars(select(Request).where(Request.id.in_(ids)))}
    return [found[i] for i in ids]


def test_a_static_call_that_never_returns_stops_the_worker_with_70(
    wedging: Settings,
    sessions: sessionmaker[Session],
    tenant_id: uuid.UUID,
    log_dir: Path,
) -> None:
    env = service_env(wedging) | {"INFERQ_ENGINE_STALL_S": "2"}
    worker = start_workers(env, log_dir, ["hangs"], tag="wedge-static")["hangs"]
    try:
        [hung] = queued_runs(sessions, tenant_id, ["HANG forever"], model="hangs")
        send(wedging, [hung])
        wait_for(lambda: worker.proc.poll() is not None, timeout=120, what="the worker to exit")
        assert worker.proc.returncode == 70, worker.tail()
        assert "the engine is wedged" in worker.tail()
    finally:
        stop(worker)
    # Its batch was failed as timed out (and committed) before the worker gave up.
    [row] = statuses(sessions, [hung])
    assert row.status is RequestStatus.FAILED
    assert "EngineTimeout: no answer within 1s" in (row.error or "")
    with sessions() as session:
        outcomes = session.scalars(
            select(LedgerEntry.outcome).where(LedgerEntry.request_id == row.id)
        ).all()
    assert outcomes == [Outcome.TIMED_OUT]


def test_an_add_that_raises_fails_only_its_request(
    wedging: Settings,
    sessions: sessionmaker[Session],
    tenant_id: uuid.UUID,
    log_dir: Path,
) -> None:
    worker = start_workers(service_env(wedging), log_dir, ["adds"], tag="wedge-add")["adds"]
    try:
        prompts = ["first one", "second one", "ADDBOOM here", "fourth one", "fifth one"]
        messages = queued_runs(sessions, tenant_id, prompts, model="adds")
        send(wedging, messages)

        def ended() -> bool:
            return all(r.status.terminal for r in statuses(sessions, messages))

        wait_for(ended, timeout=120, what="every request to end")
        rows = statuses(sessions, messages)
        assert [r.status for r in rows] == [
            RequestStatus.SUCCEEDED,
            RequestStatus.SUCCEEDED,
            RequestStatus.FAILED,
            RequestStatus.SUCCEEDED,
            RequestStatus.SUCCEEDED,
        ]
        assert rows[2].error == "EngineError: add blew up"
        # The worker goes on.
        [after] = queued_runs(sessions, tenant_id, ["after"], model="adds")
        send(wedging, [after])
        wait_for(
            lambda: statuses(sessions, [after])[0].status is RequestStatus.SUCCEEDED,
            timeout=60,
            what="the next request to succeed",
        )
        assert worker.proc.poll() is None, worker.tail()
    finally:
        stop(worker)
