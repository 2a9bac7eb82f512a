"""Swapping the model behind a route is a config change: part of a job runs on one engine,
the config changes, the worker restarts, and the rest runs on the other. The client sees
one shape throughout, and the ledger says which engine ran what."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.enums import Outcome
from core.settings import Settings
from inferq.client import Client
from storage.tables import LedgerEntry, Request
from tests.conftest import stop, wait_for
from tests.stack import own_settings, start_api, start_workers

LABELS = ["shoes", "bags", "hats"]
ROUTES = [{"task": "classify", "model": "catalog"}]
# Model A: the scripted engine, slow enough that the job is still running when it stops.
SCRIPTED = {
    "engine": "scripted",
    "path": "builtin:tiny",
    "max_batch_size": 2,
    "batch_window_ms": 0,
    "options": {"delay_ms": 700},
}
# Model B: vLLM on the tiny model, behind the same route.
VLLM = {
    "engine": "vllm",
    "path": "builtin:tiny",
    "max_model_len": 512,
    "max_batch_size": 16,
    "options": {"dtype": "float32"},
}


def _write(path: Path, spec: dict[str, object]) -> None:
    path.write_text(yaml.safe_dump({"models": {"catalog": spec}, "routes": ROUTES}))


def _engines(sessions: sessionmaker[Session], job_id: str) -> dict[str, str]:
    """Which engine produced each request's result, from the ledger."""
    with sessions() as session:
        rows = session.execute(
            select(Request.item_id, LedgerEntry.engine)
            .join(LedgerEntry, LedgerEntry.request_id == Request.id)
            .where(Request.job_id == uuid.UUID(job_id), LedgerEntry.outcome == Outcome.SUCCEEDED)
        ).all()
    engines: dict[str, str] = {}
    for item_id, engine in rows:
        assert item_id not in engines, f"{item_id} succeeded twice"
        engines[item_id] = engine
    return engines


def test_swap_the_model_behind_a_route_mid_job(
    settings: Settings,
    log_dir: Path,
    tmp_path: Path,
    api_key: str,
    sessions: sessionmaker[Session],
) -> None:
    from weights.tiny import ensure_tiny_model

    ensure_tiny_model(settings.model_cache)
    config = tmp_path / "models.yaml"
    _write(config, SCRIPTED)
    own = own_settings(settings, config)
    api, url = start_api(own, log_dir, "swap-api")
    workers = start_workers(own, log_dir, ["catalog"], tag="swap-a")
    lines = tmp_path / "items.jsonl"
    lines.write_text(
        "".join(json.dumps({"id": f"p{n}", "text": f"item {n}"}) + "\n" for n in range(24))
    )
    try:
        with Client(url, api_key, timeout_s=60) as client:
            job = client.submit_job(lines, {"task": "classify", "input": {"labels": LABELS}})

            def succeeded() -> int:
                return int(client.job(job["id"])["counts"]["succeeded"])

            wait_for(lambda: succeeded() >= 4, timeout=120, what="part of the job on model A")
            stop(workers["catalog"])
            assert succeeded() < 24, "model A finished the whole job before it was swapped"

            _write(config, VLLM)  # the swap: a config edit, then a worker restart
            workers = start_workers(own, log_dir, ["catalog"], tag="swap-b")
            wait_for(
                lambda: client.job(job["id"])["status"] == "completed",
                timeout=300,
                what="the rest of the job on model B",
            )
            results = [
                json.loads(line) for line in b"".join(client.download(job["id"])).splitlines()
            ]
    finally:
        for process in (api, *workers.values()):
            stop(process)

    engines = _engines(sessions, job["id"])
    assert set(engines.values()) == {"scripted", "vllm"}
    assert [r["id"] for r in results] == [f"p{n}" for n in range(24)]
    for result in results:
        assert result["status"] == "succeeded" and result["model"] == "catalog"
        assert result["output"] in LABELS and result["usage"]["completion_tokens"] > 0
    # One shape (keys, value types, usage keys) for every line, whichever engine ran it.
    shapes = {
        json.dumps(
            {key: type(value).__name__ for key, value in r.items()} | {"usage": sorted(r["usage"])}
        )
        for r in results
    }
    assert len(shapes) == 1, shapes
