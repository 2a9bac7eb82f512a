"""The security contract: keys hashed at rest, JSON-only Celery, no default secrets.

Pickle tests publish a message whose unpickling would create a marker file, then prove the
worker has moved past it (a later request succeeded, the message left the queue) and the
marker is absent: the message was refused, never deserialised.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from router import load_config
from storage.tables import ApiKey
from storage.tenants import hash_key
from tasks.app import create_celery
from tasks.contract import RUN_TASK_NAME
from tasks.queues import FixedQueue, model_queue
from tasks.webhooks import DELIVER_TASK
from tests.conftest import Process, wait_for

SECRETISH = {"key", "secret", "password", "token"}


class Touch:
    """Unpickling this creates ``path``: the proof that a pickle was deserialised."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (pathlib.Path.touch, (self.path,))


def test_keys_are_stored_only_as_hashes(api_key: str, sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(api_key)))
    assert row is not None
    assert row.key_hash == hashlib.sha256(api_key.encode()).hexdigest()
    stored = [str(getattr(row, c.key)) for c in ApiKey.__table__.columns]
    assert not [value for value in stored if api_key in value], "the clear key is stored"
    assert api_key.startswith(row.prefix) and len(row.prefix) < len(api_key) // 3


def test_a_key_one_character_off_is_refused(api_url: str, api_key: str) -> None:
    near = api_key[:-1] + ("A" if api_key[-1] != "A" else "B")
    for key, expected in [(near, 401), (api_key.upper(), 401), (api_key, 200)]:
        response = httpx.get(f"{api_url}/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == expected, response.text


def test_celery_takes_json_only(settings: Settings) -> None:
    app = create_celery(settings, load_config(settings.config))
    assert app.conf.accept_content == ["json"]
    assert app.conf.task_serializer == "json" and app.conf.result_serializer == "json"


def test_settings_have_no_secret_with_a_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in [v for v in os.environ if v.startswith("INFERQ_")]:
        monkeypatch.delenv(variable)
    defaults = Settings()
    assert [name for name in Settings.model_fields if "api_key" in name]
    for name in Settings.model_fields:
        if set(name.split("_")) & SECRETISH:
            assert getattr(defaults, name) in ("", None), f"{name} has a default"
    assert "@" not in defaults.database_url and ":" not in defaults.broker_url.split("//")[1]


def _publish_pickle(settings: Settings, *, task: str, args: list[Any], queue: str) -> None:
    app = create_celery(settings, load_config(settings.config))
    with app.producer_or_acquire() as producer:
        app.send_task(task, args=args, queue=queue, serializer="pickle", producer=producer)


def _queued(settings: Settings, queue: str) -> int:
    """Messages on a queue (every priority list) plus those delivered and not yet settled."""
    client = redis.Redis.from_url(settings.broker_url)
    prefix = settings.broker_key_prefix
    waiting = sum(int(client.llen(key)) for key in client.scan_iter(f"{prefix}{queue}*"))
    unacked = [v for v in client.hvals(f"{prefix}unacked") if queue.encode() in v]
    return waiting + len(unacked)


def _still_serves(client: httpx.Client, marker: Path) -> None:
    body = {"task": "complete", "model": "scripted", "input": {"prompt": "after the pickle"}}
    created = client.post("/v1/requests", json=body)
    assert created.status_code == 202, created.text
    done = client.get(f"/v1/requests/{created.json()['id']}", params={"wait": 30})
    assert done.json()["status"] == "succeeded", done.text
    assert not marker.exists(), "the pickle was deserialised"


def test_pickle_on_a_model_queue_is_refused(
    settings: Settings, workers: dict[str, Process], client: httpx.Client, tmp_path: Path
) -> None:
    marker = tmp_path / f"unpickled-{uuid.uuid4().hex}"
    queue = model_queue("scripted")
    _publish_pickle(settings, task=RUN_TASK_NAME, args=[[Touch(marker)]], queue=queue)
    wait_for(lambda: _queued(settings, queue) == 0, timeout=60, what="the pickle to be refused")
    _still_serves(client, marker)
    assert workers["scripted"].proc.poll() is None, workers["scripted"].tail()


def test_pickle_on_the_maintenance_queue_is_refused(
    settings: Settings, workers: dict[str, Process], client: httpx.Client, tmp_path: Path
) -> None:
    marker = tmp_path / f"unpickled-{uuid.uuid4().hex}"
    queue = FixedQueue.MAINTENANCE.value
    _publish_pickle(settings, task=DELIVER_TASK, args=[Touch(marker), 0], queue=queue)
    wait_for(lambda: _queued(settings, queue) == 0, timeout=60, what="the pickle to be refused")
    _still_serves(client, marker)
    assert all(p.proc.poll() is None for p in workers.values())
