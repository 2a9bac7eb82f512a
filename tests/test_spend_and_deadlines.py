"""Spending budgets and deadline-aware escalation, on real Postgres and Redis.

Budgets: ``inferq tenant budget`` sets one; admission reserves each request's worst-case cost
and refuses (429, naming the budget, spend, reserve and reset) what would not fit, on the native,
job and OpenAI paths; a finished request counts at its ledger cost instead; the report shows
spend against budget.

Deadlines: with a saturated local model (one request at a time, 0.2 s each) and a fast stand-in
for a hosted fallback, requests with a tight deadline go to the fallback at once and none
expires, while requests without a deadline stay local (and a tight deadline with no fallback to
go to expires, which is what escalation spares).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from core.enums import Outcome, RequestStatus, TaskKind
from core.settings import Settings
from inferq.cli import main
from storage.budgets import spend_against_budget
from storage.tables import LedgerEntry, Request, Tenant
from tests.conftest import new_tenant, service_env, stop, wait_for
from tests.stack import own_settings, start_workers

CONFIG = {
    "models": {
        # Hosted, priced per token, never served here: a request's worst case is exact.
        "paid": {
            "engine": "openai",
            "base_url": "http://127.0.0.1:9/v1",
            "options": {"model": "m"},
            "price_per_million_input_tokens": 10_000.0,  # 0.01 a token
            "price_per_million_output_tokens": 10_000.0,
        },
        "slow": {
            "engine": "scripted",
            "max_batch_size": 1,
            "batch_window_ms": 0,
            "options": {"delay_ms": 200},
        },
        "hosted": {"engine": "scripted", "max_batch_size": 16, "batch_window_ms": 10},
    },
    "routes": [{"task": "*", "model": "slow", "fallbacks": ["hosted"]}],
}


@pytest.fixture(scope="module")
def own(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    path = tmp_path_factory.mktemp("spend") / "models.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return own_settings(settings, path).model_copy(update={"reconciler": False})


@pytest.fixture(scope="module")
def client(own: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(own)) as http:
        yield http


def paid(prompt: str = "hi") -> dict[str, object]:
    return {
        "task": "complete",
        "model": "paid",
        "input": {"prompt": prompt},
        "params": {"max_tokens": 40},
    }


def cli(own: Settings, *args: str) -> str:
    result = CliRunner().invoke(main, list(args), env=service_env(own))
    assert result.exit_code == 0, result.output
    return result.output


def test_work_past_the_budget_is_refused_and_settles_to_the_ledger(
    own: Settings, client: TestClient, sessions: sessionmaker[Session]
) -> None:
    tenant = new_tenant(sessions, "budget")
    with sessions() as session:
        name = session.get_one(Tenant, tenant.id).name
    assert "daily" in cli(own, "tenant", "budget", name, "--daily", "1")
    for bad, why in (
        (["--daily", "-1"], "must be a finite number"),
        (["--clear", "--daily", "1"], "--clear"),
    ):
        result = CliRunner().invoke(main, ["tenant", "budget", name, *bad], env=service_env(own))
        assert result.exit_code != 0 and why in result.output, result.output
    # Each request may cost (prompt + 40) tokens at 0.01: two fit a budget of 1, not three.
    ids = []
    for _ in range(2):
        answer = client.post("/v1/requests", headers=tenant.headers, json=paid())
        assert answer.status_code == 202, answer.text
        ids.append(uuid.UUID(answer.json()["id"]))
    with sessions() as session:
        reserved = session.scalars(select(Request.reserved_cost).where(Request.id.in_(ids))).all()
    assert all(0.4 < cost <= 0.5 for cost in reserved), reserved

    refused = client.post("/v1/requests", headers=tenant.headers, json=paid())
    assert refused.status_code == 429, refused.text
    detail = refused.json()["detail"]
    for part in ("daily budget 1 ", "spent 0,", f"reserved {sum(reserved):.6g}", "resets at"):
        assert part in detail, detail
    assert int(refused.headers["Retry-After"]) <= 86400
    job = {"task": "complete", "model": "paid", "items": [{"id": "a", "prompt": "hi"}]}
    assert client.post("/v1/jobs", headers=tenant.headers, json=job).status_code == 429
    chat = {"model": "paid", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40}
    answer = client.post("/v1/chat/completions", headers=tenant.headers, json=chat)
    assert answer.status_code == 429 and "budget" in answer.json()["error"]["message"]

    # The first request finishes at a ledger cost of 0.05: its reservation is released.
    finish(sessions, ids[0], tenant.id, cost=0.05)

    def admitted() -> bool:
        return client.post("/v1/requests", headers=tenant.headers, json=paid()).status_code == 202

    wait_for(admitted, timeout=10, what="the settled reservation to make room")
    with sessions() as session:
        [day] = [r for r in spend_against_budget(session, tenant=name) if r["period"] == "daily"]
    assert day["spent"] == pytest.approx(0.05)
    assert 0.8 < day["reserved"] <= 1.0
    shown = cli(own, "tenant", "budget", name)
    assert "daily" in shown and "0.05" in shown
    report = json.loads(cli(own, "report", "--json"))
    assert any(r["tenant"] == name for r in report["sections"]["budgets"])
    assert "budget cleared" in cli(own, "tenant", "budget", name, "--clear")


def finish(
    sessions: sessionmaker[Session], request_id: uuid.UUID, tenant_id: uuid.UUID, *, cost: float
) -> None:
    """What a worker's writer commits for a success: the request's row and its ledger row."""
    with sessions.begin() as session:
        session.execute(
            update(Request)
            .where(Request.id == request_id)
            .values(status=RequestStatus.SUCCEEDED, output="done")
        )
        session.add(
            LedgerEntry(
                request_id=request_id,
                tenant_id=tenant_id,
                task=TaskKind.COMPLETE,
                model="paid",
                engine="openai",
                worker="test",
                batch_id=uuid.uuid4(),
                batch_size=1,
                prompt_tokens=2,
                completion_tokens=3,
                queue_wait_s=0.0,
                engine_s=0.1,
                gpu_seconds=0.0,
                cost=cost,
                outcome=Outcome.SUCCEEDED,
            )
        )


def test_tight_deadlines_escalate_to_the_fallback_and_none_expires(
    own: Settings, client: TestClient, sessions: sessionmaker[Session], log_dir: Path
) -> None:
    tenant = new_tenant(sessions, "deadline")
    workers = start_workers(own, log_dir, ["slow", "hosted"], tag="deadline")
    try:

        def submit(prompt: str, **extra: object) -> str:
            body = {"task": "complete", "input": {"prompt": prompt}, **extra}
            answer = client.post("/v1/requests", headers=tenant.headers, json=body)
            assert answer.status_code == 202, answer.text
            return str(answer.json()["id"])

        backlog = [submit(f"local {i}") for i in range(15)]  # 3 s of work for "slow"
        wait_for(lambda: done(sessions, backlog) >= 3, timeout=30, what="a measured rate")
        tight = [submit(f"tight {i}", deadline_s=1.0) for i in range(8)]
        # Pinned to the slow model, there is nowhere to go: these expire in its queue.
        stuck = [submit(f"pinned {i}", deadline_s=1.0, model="slow") for i in range(2)]
        wait_for(
            lambda: finished(sessions, [*backlog, *tight, *stuck]),
            timeout=60,
            what="every request to finish",
        )
        rows = fetch(sessions, [*backlog, *tight, *stuck])
    finally:
        for process in workers.values():
            stop(process)
    for request_id in tight:
        row = rows[request_id]
        assert (row.status, row.model, row.first_model) == (
            RequestStatus.SUCCEEDED,
            "hosted",
            "slow",
        )
        assert row.fallback_reason.startswith("slow: deadline: would start in"), row
    for request_id in backlog:
        assert (rows[request_id].status, rows[request_id].model) == (
            RequestStatus.SUCCEEDED,
            "slow",
        )
        assert rows[request_id].fallback_reason is None
    assert {rows[r].status for r in stuck} == {RequestStatus.EXPIRED}


def fetch(sessions: sessionmaker[Session], ids: list[str]) -> dict[str, Request]:
    with sessions() as session:
        found = session.scalars(select(Request).where(Request.id.in_([uuid.UUID(i) for i in ids])))
        return {str(row.id): row for row in found}


def done(sessions: sessionmaker[Session], ids: list[str]) -> int:
    return sum(row.status is RequestStatus.SUCCEEDED for row in fetch(sessions, ids).values())


def finished(sessions: sessionmaker[Session], ids: list[str]) -> bool:
    return all(row.status.terminal for row in fetch(sessions, ids).values())
