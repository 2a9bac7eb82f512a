"""Retention: deleting uploaded files, the per-tenant file quota, and `inferq prune`, which
removes old files and request payloads but leaves the ledger and `inferq report` as they were.

A file used by a batch still in progress may be deleted: the batch took its own copy of the
lines when it was created, so it runs on to the end."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from storage.openai_files import Batch, StoredFile
from storage.tables import Job, LedgerEntry, Request
from tests.conftest import new_tenant, service_env, start_api, stop, wait_for

QUOTA = 1000


def chat_line(custom_id: str, text: str) -> bytes:
    body = {"model": "scripted", "messages": [{"role": "user", "content": text}]}
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
    return json.dumps(line).encode() + b"\n"


def upload(client: httpx.Client, data: bytes) -> httpx.Response:
    files = {"file": ("input.jsonl", data, "application/x-ndjson")}
    return client.post("/v1/files", data={"purpose": "batch"}, files=files)


def other_client(api_url: str, sessions: sessionmaker[Session]) -> httpx.Client:
    headers = new_tenant(sessions, "other").headers
    return httpx.Client(base_url=api_url, headers=headers, timeout=60)


def wait_batch(client: httpx.Client, batch_id: str) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []

    def ended() -> bool:
        seen.append(client.get(f"/v1/batches/{batch_id}").json())
        return seen[-1]["status"] in ("completed", "failed", "expired", "cancelled")

    wait_for(ended, timeout=120, what=f"batch {batch_id} to end")
    return seen[-1]


def test_delete_a_file_then_it_is_gone_for_everyone(
    client: httpx.Client, api_url: str, sessions: sessionmaker[Session]
) -> None:
    file_id = upload(client, chat_line("a", "hi")).json()["id"]
    with other_client(api_url, sessions) as other:
        refused = other.delete(f"/v1/files/{file_id}")
        assert refused.status_code == 404, refused.text
    assert client.get(f"/v1/files/{file_id}").status_code == 200

    deleted = client.delete(f"/v1/files/{file_id}")
    assert deleted.status_code == 200
    assert deleted.json() == {"id": file_id, "object": "file", "deleted": True}
    assert client.get(f"/v1/files/{file_id}").status_code == 404
    assert client.get(f"/v1/files/{file_id}/content").status_code == 404
    assert client.delete(f"/v1/files/{file_id}").status_code == 404
    assert client.get("/v1/files").json()["data"] == []


def test_deleting_the_input_of_a_batch_in_progress_lets_it_finish(
    client: httpx.Client, sessions: sessionmaker[Session], workers: object
) -> None:
    lines = b"".join(chat_line(f"r{i}", f"SLOW {i}") for i in range(6))
    file_id = upload(client, lines).json()["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "1h"}
    batch = client.post("/v1/batches", json=body).json()
    assert batch["status"] in ("validating", "in_progress"), batch
    assert client.delete(f"/v1/files/{file_id}").json()["deleted"] is True

    done = wait_batch(client, batch["id"])
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 6, done
    content = client.get(f"/v1/files/{done['output_file_id']}/content").content
    output = content.splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in output) == [f"r{i}" for i in range(6)]
    assert client.get(f"/v1/files/{done['output_file_id']}").json()["bytes"] == len(content)
    with sessions() as session:  # counted once, then read back rather than written out again
        job = session.scalar(
            select(Job).join(Batch, Batch.job_id == Job.id).where(Batch.id == batch["id"])
        )
        assert job is not None and (job.shared or {})["output_bytes"] == len(content)
    generated = client.delete(f"/v1/files/{done['output_file_id']}")
    assert generated.status_code == 400 and "not stored" in generated.text


@pytest.fixture(scope="module")
def quota_api(settings: Settings, log_dir: Path) -> Iterator[str]:
    """An API whose tenants may keep ``QUOTA`` bytes of files."""
    env = {
        **service_env(settings),
        "INFERQ_TENANT_FILE_QUOTA_BYTES": str(QUOTA),
        "INFERQ_RECONCILER": "false",
    }
    process, url = start_api(env, log_dir, "quota-api")
    yield url
    stop(process)


def test_the_file_quota_refuses_an_upload_naming_it_until_files_are_deleted(
    quota_api: str, api_key: str
) -> None:
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=quota_api, headers=headers, timeout=60) as client:
        first = upload(client, chat_line("a", "x" * 500))
        assert first.status_code == 200, first.text
        refused = upload(client, chat_line("b", "y" * 500))
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert (
            error["code"] == "quota_exceeded" and f"the quota is {QUOTA} bytes" in error["message"]
        )
        assert [f["id"] for f in client.get("/v1/files").json()["data"]] == [first.json()["id"]]

        assert client.delete(f"/v1/files/{first.json()['id']}").status_code == 200
        assert upload(client, chat_line("b", "y" * 500)).status_code == 200


def inferq(settings: Settings, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "inferq.cli", "--log-level", "WARNING", *args],
        env=service_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def ledger_of(sessions: sessionmaker[Session], ids: list[uuid.UUID]) -> list[tuple[Any, ...]]:
    with sessions() as session:
        rows = session.scalars(
            select(LedgerEntry).where(LedgerEntry.request_id.in_(ids)).order_by(LedgerEntry.id)
        )
        return [
            (r.request_id, r.outcome, r.prompt_tokens, r.completion_tokens, r.cost, r.created_at)
            for r in rows
        ]


def succeeded(client: httpx.Client, request_id: uuid.UUID) -> bool:
    answer = client.get(f"/v1/requests/{request_id}", params={"wait": 5}).json()
    return bool(answer["status"] == "succeeded")


def test_prune_empties_old_payloads_and_files_and_keeps_the_ledger_figures(
    client: httpx.Client, settings: Settings, sessions: sessionmaker[Session], workers: object
) -> None:
    started = datetime.now(UTC) - timedelta(minutes=1)
    ids = []
    for prompt in ("old one", "old two", "young"):
        body = {"task": "complete", "model": "scripted", "input": {"prompt": prompt}}
        ids.append(uuid.UUID(client.post("/v1/requests", json=body).json()["id"]))
    wait_for(lambda: all(succeeded(client, i) for i in ids), timeout=120, what="requests done")
    old_file = upload(client, chat_line("a", "old")).json()["id"]
    young_file = upload(client, chat_line("b", "young")).json()["id"]
    long_ago = timedelta(days=400)
    with sessions.begin() as session:  # two requests and a file as if from last year
        session.execute(
            update(Request)
            .where(Request.id.in_(ids[:2]))
            .values(
                created_at=Request.created_at - long_ago,
                finished_at=Request.finished_at - long_ago,
            )
        )
        session.execute(
            update(StoredFile)
            .where(StoredFile.id == old_file)
            .values(created_at=StoredFile.created_at - long_ago)
        )
    until = datetime.now(UTC).isoformat()
    report = ["report", "--json", "--by", "tenant", "--since", started.isoformat(), "--until"]
    before, ledger = inferq(settings, *report, until), ledger_of(sessions, ids)
    assert len(ledger) >= 3

    out = inferq(settings, "prune", "--older-than", "365d")
    assert "files" in out and "request payloads emptied" in out
    assert inferq(settings, *report, until) == before
    assert ledger_of(sessions, ids) == ledger
    with sessions() as session:
        rows = {r.id: r for r in session.scalars(select(Request).where(Request.id.in_(ids)))}
    assert [(rows[i].input, rows[i].output) for i in ids[:2]] == [({}, None), ({}, None)]
    assert rows[ids[2]].input == {"prompt": "young"} and rows[ids[2]].output is not None
    assert all(rows[i].status.value == "succeeded" for i in ids)
    assert client.get(f"/v1/files/{old_file}").status_code == 404
    assert client.get(f"/v1/files/{young_file}").status_code == 200
    again = inferq(settings, "prune", "--older-than", "365d")
    assert "0 request payloads emptied" in again
