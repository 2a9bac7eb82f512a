"""No request wedges a real vLLM worker: a seed the engine cannot take, arriving on the queue
without passing the API's checks, fails alone with its reason, and the worker goes on."""

from __future__ import annotations

import uuid

import httpx
from sqlalchemy.orm import Session, sessionmaker

from inferq.enums import Priority, RequestStatus, TaskKind
from inferq.settings import Settings
from router import load_config
from storage.models import Request
from storage.tenants import create_tenant
from tasks.app import create_celery, publish
from tasks.queues import model_queue
from tests.conftest import Process, message_for, wait_for

OVERFLOWING_SEED = 18446744073709551616  # 2**64: vLLM's sampler overflows, then spins


def test_an_overflowing_seed_on_the_queue_fails_alone_and_the_worker_goes_on(
    settings: Settings,
    sessions: sessionmaker[Session],
    workers: dict[str, Process],
    api_url: str,
) -> None:
    with sessions.begin() as session:
        tenant, key = create_tenant(session, f"wedge-{uuid.uuid4().hex[:8]}")
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
        message = message_for(row)
    message.engine_request.temperature = 0.8
    message.engine_request.seed = OVERFLOWING_SEED
    celery = create_celery(settings, load_config(settings.config))
    publish(celery, [message], queue=model_queue("tiny"), bundle_size=1)

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
