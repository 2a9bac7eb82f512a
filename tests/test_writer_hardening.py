"""No result wedges the writer: an output the database cannot store, or one that cannot even be
read, fails its own request with the reason; the rest of its batch commits, and the worker goes
on. Run on real `inferq` API and worker processes (a static and a continuous scripted engine)
against the session's Postgres and Redis."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import exc as sa_exc
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from core.enums import Outcome, RequestStatus
from core.settings import Settings
from storage.db import make_engine
from storage.tables import LedgerEntry, Request
from tests.conftest import Process, stop, wait_for
from tests.stack import own_settings, start_api, start_workers
from workers.writer import is_connection_error

DIGITS = "1" + "0" * 5000  # past Python's 4,300-digit limit for int()
DEEP = "[" * 10_000 + "]" * 10_000  # past Python's recursion limit
# Hours of backtracking for Python's re against ^(a+)+$; RE2 answers at once.
BACKTRACKS = "a" * 5000 + "b"
RULES = [
    {"match": "BACKTRACK", "answer": '{"x": "' + BACKTRACKS + '"}'},
    {"match": "BACKKEY", "answer": '{"' + BACKTRACKS + '": 1}'},
    {"match": "MATCHES", "answer": '{"x": "aaaa", "aaa": 1}'},
    {"match": "NONFINITE", "answer": '{"x": 1e999}'},
    {"match": "MANYDIGITS", "answer": '{"x": ' + DIGITS + "}"},
    {"match": "TOODEEP", "answer": '{"x": ' + DEEP + "}"},
    # Postgres text cannot hold NUL: storing this failure's reason is a data error at commit.
    {"match": "NULREASON", "fail": "the engine said \x00 here"},
]
MODELS = {
    "outputs": {  # static: a micro-batch, one engine call
        "engine": "scripted",
        "path": "builtin:tiny",
        "max_batch_size": 16,
        "batch_window_ms": 300,
        "options": {"rules": RULES},
    },
    "outputs-continuous": {
        "engine": "scripted",
        "path": "builtin:tiny",
        "max_batch_size": 16,
        "options": {"continuous": True, "rules": RULES},
    },
}
CONFIG = {"models": MODELS, "routes": [{"task": "*", "model": "outputs"}]}
SCHEMA = {"type": "object", "properties": {"x": {"type": "number"}}}
UNRESOLVABLE = {"type": "object", "properties": {"x": {"$ref": "#/$defs/nowhere"}}}
PATTERNED = {
    "type": "object",
    "properties": {"x": {"type": "string", "pattern": "^(a+)+$"}},
    "patternProperties": {"^(a+)+$": {"type": "integer"}},
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def stack(
    settings: Settings, log_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict[str, Process]]]:
    from weights.tiny import ensure_tiny_model

    ensure_tiny_model(settings.model_cache)
    path = tmp_path_factory.mktemp("writer") / "models.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    own = own_settings(settings, path)
    workers = start_workers(own, log_dir, list(MODELS), tag="writer")
    api, url = start_api(own, log_dir, "writer-api")
    yield url, workers
    for process in (api, *workers.values()):
        stop(process)


@pytest.fixture
def client(stack: tuple[str, dict[str, Process]], api_key: str) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=stack[0], headers=headers, timeout=60) as http:
        yield http


def run_job(
    client: httpx.Client, model: str, items: list[dict[str, Any]]
) -> tuple[uuid.UUID, dict[str, dict[str, Any]]]:
    """Submit items as one job (one bundle on the queue, so one batch) and wait for all;
    the job's id and its result lines by item id."""
    body = {"task": "extract", "model": model, "input": {"schema": SCHEMA}, "items": items}
    created = client.post("/v1/jobs", json=body)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]

    def finished() -> bool:
        counts = client.get(f"/v1/jobs/{job_id}").json()["counts"]
        return int(counts["queued"]) + int(counts["running"]) == 0

    wait_for(finished, timeout=120, what=f"job {job_id} to finish")
    lines = client.get(f"/v1/jobs/{job_id}/results").text.splitlines()
    return uuid.UUID(job_id), {row["id"]: row for row in map(json.loads, lines)}


def item(item_id: str, text: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    own: dict[str, Any] = {"text": text}
    if schema is not None:
        own["schema"] = schema
    return {"id": item_id, "input": own}


FINE = [item(f"fine{i}", f"a fine product {i}") for i in range(3)]


@pytest.mark.parametrize("model", list(MODELS))
def test_unreadable_outputs_fail_alone_and_the_batch_commits(
    client: httpx.Client,
    stack: tuple[str, dict[str, Process]],
    sessions: sessionmaker[Session],
    model: str,
) -> None:
    items = [
        FINE[0],
        item("nonfinite", "NONFINITE"),
        FINE[1],
        item("digits", "MANYDIGITS"),
        item("deep", "TOODEEP"),
        item("ref", "a product", UNRESOLVABLE),
        item("backtrack", "BACKTRACK", PATTERNED),
        item("backkey", "BACKKEY", PATTERNED),
        item("matches", "MATCHES", PATTERNED),
        FINE[2],
    ]
    job_id, results = run_job(client, model, items)
    assert {k: r["status"] for k, r in results.items()} == {
        "fine0": "succeeded",
        "fine1": "succeeded",
        "fine2": "succeeded",
        "nonfinite": "failed",
        "digits": "failed",
        "deep": "failed",
        "ref": "failed",
        "backtrack": "failed",
        "backkey": "failed",
        "matches": "succeeded",
    }
    assert results["fine0"]["output"] == {"x": 0}
    assert "non-finite number: 1e999" in results["nonfinite"]["error"]
    assert "4300 digits" in results["digits"]["error"]
    assert "nested too deeply" in results["deep"]["error"]
    assert "/$defs/nowhere" in results["ref"]["error"]
    assert "does not match '^(a+)+$'" in results["backtrack"]["error"]
    assert "Additional properties are not allowed" in results["backkey"]["error"]
    assert results["matches"]["output"] == {"x": "aaaa", "aaa": 1}
    if model == "outputs":  # the static engine ran them all in one call
        with sessions() as session:
            batches = set(
                session.scalars(
                    select(LedgerEntry.batch_id)
                    .join(Request, Request.id == LedgerEntry.request_id)
                    .where(Request.job_id == job_id)
                )
            )
        assert len(batches) == 1
    next_one_succeeds(client, model, stack[1][model])


def test_a_data_error_at_commit_fails_that_request_and_the_rest_commit(
    client: httpx.Client,
    stack: tuple[str, dict[str, Process]],
    sessions: sessionmaker[Session],
) -> None:
    for model in MODELS:
        job_id, results = run_job(
            client, model, [FINE[0], item("nul", "NULREASON"), FINE[1], FINE[2]]
        )
        statuses = {k: r["status"] for k, r in results.items()}
        assert statuses == {
            "fine0": "succeeded",
            "nul": "failed",
            "fine1": "succeeded",
            "fine2": "succeeded",
        }, model
        error = results["nul"]["error"]
        assert error.startswith("the result could not be stored: DataError"), error
        assert "NUL" in error and "the engine said \\0 here" in error
        with sessions() as session:
            [outcome] = session.scalars(
                select(LedgerEntry.outcome)
                .join(Request, Request.id == LedgerEntry.request_id)
                .where(Request.job_id == job_id, Request.item_id == "nul")
            )
        assert outcome is Outcome.FAILED
        next_one_succeeds(client, model, stack[1][model])


def next_one_succeeds(client: httpx.Client, model: str, worker: Process) -> None:
    body = {"task": "complete", "model": model, "input": {"prompt": "after"}}
    answer = client.post("/v1/requests", json=body).json()
    done = client.get(f"/v1/requests/{answer['id']}", params={"wait": 30}).json()
    assert done["status"] == RequestStatus.SUCCEEDED.value, done
    assert worker.proc.poll() is None, worker.tail()


def test_only_connection_errors_are_retried(sessions: sessionmaker[Session]) -> None:
    """What the writer retries, classified on errors real Postgres gives."""
    nowhere = make_engine("postgresql://postgres@127.0.0.1:1/test")  # nothing listens there
    with pytest.raises(sa_exc.OperationalError) as refused:
        nowhere.connect()
    nowhere.dispose()
    assert is_connection_error(refused.value)
    with sessions() as session, pytest.raises(sa_exc.DBAPIError) as nul:
        session.execute(text("select cast(:v as text)"), {"v": "a\x00b"})
    assert not is_connection_error(nul.value)
    with sessions() as session, pytest.raises(sa_exc.DBAPIError) as bad_json:
        session.execute(text("select cast(:v as json)"), {"v": '{"x": Infinity}'})
    assert not is_connection_error(bad_json.value)
    with sessions() as session, pytest.raises(sa_exc.DBAPIError) as killed:
        session.execute(text("select pg_terminate_backend(pg_backend_pid())"))
        session.execute(text("select 1"))
    assert is_connection_error(killed.value)
