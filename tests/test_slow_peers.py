"""Slow or hostile peers cannot hold threads: trickling webhook receivers, long polls, and
values that would fail a whole group commit.

Everything runs as it would arrive: a real ``inferq webhooks`` process posting to real local
servers, and a real ``inferq api`` process (long polls capped at 2 per tenant) with requests
on the ``parked`` model, which no worker serves, so they stay queued while polled.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from storage.webhooks import DeliveryStatus, WebhookDelivery, enqueue_delivery
from tasks.webhooks import publish_deliveries
from tests import test_webhooks as hooks
from tests.conftest import Process, new_tenant, service_env, start_api, stop, wait_for
from tests.peers import tricklers
from tests.test_webhooks import Receiver, delivery, enqueue
from weights.tiny import ensure_tiny_model

DEADLINE_S = 3
WAIT_CAP = 2
HOLD_S = 8  # how long the capped polls wait: the probes below run meanwhile
receiver = hooks.receiver
celery_app = hooks.celery_app


# --- webhooks: eight trickling receivers and a good one -------------------------------------


@pytest.fixture(scope="module")
def webhook_worker(settings: Settings, log_dir: Path) -> Iterator[Process]:
    """`inferq webhooks` with its default threads, a short attempt deadline, loopback allowed."""
    yield from hooks.run_webhook_worker(
        "slow-peers-webhooks", settings, log_dir, INFERQ_WEBHOOK_DEADLINE_S=str(DEADLINE_S)
    )


def test_trickling_receivers_do_not_stop_delivery_to_others(
    sessions: sessionmaker[Session],
    tenant_id: uuid.UUID,
    receiver: Receiver,
    celery_app: Any,
    webhook_worker: Process,
) -> None:
    with tricklers(8) as slow:
        with sessions.begin() as session:
            slow_ids = [
                enqueue_delivery(
                    session,
                    tenant_id=tenant_id,
                    url=peer.url,
                    event_type="job.completed",
                    payload={},
                )
                for _ in range(2)
                for peer in slow  # one each first: eight attempts take all of eight threads
            ]
        publish_deliveries(celery_app, slow_ids)
        wait_for(
            lambda: all(peer.connections >= 1 for peer in slow),
            timeout=60,
            what=f"all eight tricklers to be attempted:\n{webhook_worker.tail()}",
        )

        good_ids = [enqueue(sessions, tenant_id, receiver) for _ in range(3)]
        publish_deliveries(celery_app, good_ids)

        def delivered() -> bool:
            return all(delivery(sessions, i).status == DeliveryStatus.SUCCEEDED for i in good_ids)

        wait_for(delivered, timeout=60, what=f"the good deliveries:\n{webhook_worker.tail()}")
        assert len(receiver.hits) == 3 and all(hit.problem is None for hit in receiver.hits)

        def cut_off() -> bool:
            with sessions() as session:
                rows = [session.get(WebhookDelivery, i) for i in slow_ids]
            return all(
                row is not None and row.last_error == f"no complete answer within {DEADLINE_S}s"
                for row in rows
            )

        wait_for(cut_off, timeout=120, what="every trickled attempt to end at the deadline")


# --- long polls and group commits, through a real API ---------------------------------------


@pytest.fixture(scope="module")
def capped_api(settings: Settings, log_dir: Path) -> Iterator[str]:
    ensure_tiny_model(settings.model_cache)  # the parked model counts tokens with it
    env = service_env(settings) | {
        "INFERQ_MAX_WAITS_PER_TENANT": str(WAIT_CAP),
        "INFERQ_MAX_WAIT_S": "20",
    }
    process, url = start_api(env, log_dir, "capped-api")
    yield url
    stop(process)


def tenant_client(sessions: sessionmaker[Session], url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers=new_tenant(sessions).headers, timeout=60)


def parked(client: httpx.Client, prompt: str = "hello") -> str:
    body = {"task": "complete", "input": {"prompt": prompt}, "model": "parked"}
    response = client.post("/v1/requests", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_long_polls_are_capped_per_tenant(sessions: sessionmaker[Session], capped_api: str) -> None:
    with (
        tenant_client(sessions, capped_api) as tenant_a,
        tenant_client(sessions, capped_api) as tenant_b,
    ):
        ids = [parked(tenant_a) for _ in range(WAIT_CAP + 1)]
        held: list[httpx.Response] = []

        def hold(request_id: str) -> None:
            while True:  # a probe below may hold a slot for a moment: retry the 429
                response = tenant_a.get(f"/v1/requests/{request_id}", params={"wait": HOLD_S})
                if response.status_code != 429:
                    held.append(response)
                    return

        pollers = [threading.Thread(target=hold, args=(i,), daemon=True) for i in ids[:WAIT_CAP]]
        for poller in pollers:
            poller.start()

        def probe() -> httpx.Response:
            return tenant_a.get(f"/v1/requests/{ids[-1]}", params={"wait": 0.05})

        wait_for(lambda: probe().status_code == 429, timeout=60, what="a poll over the cap")
        refused = probe()
        assert refused.status_code == 429
        assert f"the limit is {WAIT_CAP}" in refused.json()["detail"]
        assert refused.headers["retry-after"] == "1"

        chat = {"model": "parked", "messages": [{"role": "user", "content": "hi"}]}
        over = tenant_a.post("/v1/chat/completions", json=chat)
        assert over.status_code == 429, over.text
        assert over.json()["error"]["code"] == "rate_limit_exceeded"

        other = tenant_b.get(f"/v1/requests/{parked(tenant_b)}", params={"wait": 0.2})
        assert other.status_code == 200 and other.json()["status"] == "queued"

        for poller in pollers:
            poller.join(60)
        assert [r.status_code for r in held] == [200] * WAIT_CAP
        assert probe().status_code == 200  # the slots were given back


def raw_post(client: httpx.Client, path: str, text: str) -> httpx.Response:
    """Post JSON text as written: Python's JSON reader takes ``NaN`` and ``\\u0000``."""
    return client.post(path, content=text, headers={"content-type": "application/json"})


def test_values_postgres_refuses_are_4xx_and_neighbours_commit(
    sessions: sessionmaker[Session], capped_api: str
) -> None:
    schema_nan = '{"type":"object","properties":{"a":{"type":"number","maximum":NaN}}}'
    bad = {
        "prompt with NUL": (
            "/v1/requests",
            '{"task":"complete","model":"parked","input":{"prompt":"a\\u0000b"}}',
            "input.prompt: contains a NUL character",
        ),
        "key with NUL": (
            "/v1/requests",
            '{"task":"complete","model":"parked","input":{"prompt":"hi"},'
            '"idempotency_key":"k\\u0000"}',
            "idempotency_key: contains a NUL character",
        ),
        "NaN in a schema": (
            "/v1/requests",
            '{"task":"extract","model":"parked","input":{"text":"hi","schema":' + schema_nan + "}}",
            "input.schema: Value error, NaN and Infinity are not JSON numbers",
        ),
        "chat message with NUL": (
            "/v1/chat/completions",
            '{"model":"parked","messages":[{"role":"user","content":"a\\u0000"}]}',
            "messages.0.content: contains a NUL character",
        ),
        "chat schema with NaN": (
            "/v1/chat/completions",
            '{"model":"parked","messages":[{"role":"user","content":"hi"}],'
            '"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":'
            + schema_nan
            + "}}}",
            "response_format.json_schema.schema.properties.a.maximum: NaN and Infinity are not",
        ),
        "chat metadata with NaN": (
            "/v1/chat/completions",
            '{"model":"parked","messages":[{"role":"user","content":"hi"}],"metadata":{"k":NaN}}',
            "metadata.k",
        ),
    }
    good = json.dumps({"task": "complete", "model": "parked", "input": {"prompt": "fine"}})
    with tenant_client(sessions, capped_api) as client:
        sends = [("/v1/requests", good)] * 40 + [(path, text) for path, text, _ in bad.values()]
        with ThreadPoolExecutor(len(sends)) as pool:  # at once: they share group commits
            answers = list(pool.map(lambda s: raw_post(client, *s), sends))
        good_answers, bad_answers = answers[:40], answers[40:]
        assert {r.status_code for r in good_answers} == {202}
        for (name, (_path, _text, expected)), response in zip(
            bad.items(), bad_answers, strict=True
        ):
            assert response.status_code in (400, 422), (name, response.text)
            assert expected in response.text, (name, response.text)
        listed = [client.get(f"/v1/requests/{r.json()['id']}") for r in good_answers]
        assert {r.json()["status"] for r in listed} == {"queued"}
