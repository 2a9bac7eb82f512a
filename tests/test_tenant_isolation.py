"""Tenant isolation, property-based: two tenants create requests, jobs, files, batches and
webhook endpoints in any order, cancel some of their own, and each tries every read, list,
cancel, replay and download on the other's ids. Every such attempt answers 404, lists never
hold the other's ids, and the owner still reads what the stranger could not touch.

Objects go to the ``parked`` model, which no worker serves: they stay queued, nothing runs.
"""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from dataclasses import dataclass

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy.orm import Session, sessionmaker

from storage.tenants import create_tenant

# A public address literal: accepted as a webhook URL without a DNS lookup; never reached,
# since no webhook worker runs here.
HOOK = "https://93.184.216.34/hooks"
PROMPT = {"task": "complete", "model": "parked", "input": {"prompt": "hello"}}

# What a stranger tries on each kind of object; ``{id}`` is the owner's id.
ATTACKS = {
    "request": ["GET /v1/requests/{id}", "GET /v1/requests/{id}?wait=0.1"],
    "job": [
        "GET /v1/jobs/{id}",
        "POST /v1/jobs/{id}/cancel",
        "GET /v1/jobs/{id}/results",
        "GET /v1/jobs/{id}/errors",
    ],
    "file": ["GET /v1/files/{id}", "GET /v1/files/{id}/content"],
    "batch": ["GET /v1/batches/{id}", "POST /v1/batches/{id}/cancel"],
    "delivery": [
        "GET /v1/webhook-deliveries/{id}",
        "POST /v1/webhook-deliveries/{id}/replay",
    ],
}
OWNER_READ = {
    "request": "/v1/requests/{id}",
    "job": "/v1/jobs/{id}",
    "file": "/v1/files/{id}",
    "batch": "/v1/batches/{id}",
    "delivery": "/v1/webhook-deliveries/{id}",
}
LISTS = ["/v1/jobs", "/v1/files", "/v1/batches", "/v1/webhook-endpoints", "/v1/webhook-deliveries"]


@dataclass(frozen=True)
class Owned:
    kind: str
    owner: int
    id: str


def batch_file(model: str = "parked") -> bytes:
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": "hi"}]},
    }
    return json.dumps(line).encode() + b"\n"


def ghost(object_id: str) -> str:
    """An id of the same shape as ``object_id`` that names nothing."""
    try:
        uuid.UUID(object_id)
    except ValueError:
        return re.sub("[0-9a-f]{32}", uuid.uuid4().hex, object_id)
    return str(uuid.uuid4())


class TwoTenants(RuleBasedStateMachine):
    """Two fresh tenants per run; bound to the running API by :func:`machine`."""

    api_url: str
    sessions: sessionmaker[Session]
    attacked: Counter[str]  # kinds tried by a stranger, across runs: the test checks all were
    objects = Bundle("objects")

    def __init__(self) -> None:
        super().__init__()
        self.http: list[httpx.Client] = []
        with self.sessions.begin() as session:
            for _ in range(2):
                _tenant, key = create_tenant(session, f"iso-{uuid.uuid4().hex[:10]}")
                headers = {"Authorization": f"Bearer {key}"}
                self.http.append(httpx.Client(base_url=self.api_url, headers=headers, timeout=60))
        self.ids: list[set[str]] = [set(), set()]
        self.endpoint_urls: list[set[str]] = [set(), set()]
        self.owned: list[Owned] = []

    def teardown(self) -> None:
        """At the end of each run the stranger tries every object made in it."""
        try:
            for owned in self.owned:
                self._attack(owned)
        finally:
            for client in self.http:
                client.close()

    def _keep(self, kind: str, who: int, object_id: str) -> Owned:
        self.ids[who].add(object_id)
        self.owned.append(Owned(kind, who, object_id))
        return self.owned[-1]

    @initialize(target=objects)
    def one_of_each(self) -> object:
        """Every kind exists from the start, so each run has something of each to try."""
        job, (upload, batch) = self.create_job(0, 1), self.create_batch(1).values
        after_job, after_batch = self.cancel_own(job).values, self.cancel_own(batch).values
        return multiple(self.create_request(0), job, upload, batch, *after_job, *after_batch)

    @rule(target=objects, who=st.integers(0, 1))
    def create_request(self, who: int) -> Owned:
        response = self.http[who].post("/v1/requests", json=PROMPT)
        assert response.status_code == 202, response.text
        return self._keep("request", who, response.json()["id"])

    @rule(target=objects, who=st.integers(0, 1), items=st.integers(1, 3))
    def create_job(self, who: int, items: int) -> Owned:
        body = {
            "task": "complete",
            "model": "parked",
            "webhook_url": HOOK,
            "items": [{"id": f"i{n}", "prompt": "hi"} for n in range(items)] + [{"id": 7}],
        }
        response = self.http[who].post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        return self._keep("job", who, response.json()["id"])

    @rule(target=objects, who=st.integers(0, 1))
    def create_batch(self, who: int) -> object:
        files = {"file": ("in.jsonl", batch_file())}
        uploaded = self.http[who].post("/v1/files", data={"purpose": "batch"}, files=files)
        assert uploaded.status_code == 200, uploaded.text
        file_id = uploaded.json()["id"]
        body = {
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        batch = self.http[who].post("/v1/batches", json=body)
        assert batch.status_code == 200, batch.text
        return multiple(
            self._keep("file", who, file_id), self._keep("batch", who, batch.json()["id"])
        )

    @rule(who=st.integers(0, 1), path=st.sampled_from(["a", "b"]))
    def register_endpoint(self, who: int, path: str) -> None:
        url = f"{HOOK}/{path}"
        response = self.http[who].post("/v1/webhook-endpoints", json={"url": url})
        assert response.status_code == 200, response.text
        self.endpoint_urls[who].add(url)
        self.ids[who].add(response.json()["id"])

    @rule(target=objects, owned=objects)
    def cancel_own(self, owned: Owned) -> object:
        """The owner cancels a job or batch; a cancelled job with a webhook announces it,
        and a cancelled batch gets an error file: more ids for the stranger to try."""
        if owned.kind not in ("job", "batch"):
            return multiple()
        client = self.http[owned.owner]
        plural = f"{owned.kind}es" if owned.kind == "batch" else f"{owned.kind}s"
        response = client.post(f"/v1/{plural}/{owned.id}/cancel")
        if owned.kind == "batch":
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "cancelled", response.text
            error_file = response.json()["error_file_id"]
            return multiple(self._keep("file", owned.owner, error_file))
        assert response.status_code == 200, response.text
        listed = client.get("/v1/webhook-deliveries").json()["data"]
        fresh = [d["id"] for d in listed if d["id"] not in self.ids[owned.owner]]
        return multiple(*(self._keep("delivery", owned.owner, d) for d in fresh))

    @rule(owned=objects)
    def stranger_tries_everything(self, owned: Owned) -> None:
        self._attack(owned)

    def _attack(self, owned: Owned) -> None:
        """Every call on the owner's id answers 404, as for an id that names nothing, and
        the owner can still read it."""
        stranger = self.http[1 - owned.owner]
        self.attacked[owned.kind] += 1
        made_up = ghost(owned.id)
        for attack in ATTACKS[owned.kind]:
            method, path = attack.split(" ")
            response = stranger.request(method, path.format(id=owned.id))
            assert response.status_code == 404, f"{attack} by a stranger: {response.text}"
            absent = stranger.request(method, path.format(id=made_up))
            assert response.text == absent.text.replace(made_up, owned.id), attack
        mine = self.http[owned.owner].get(OWNER_READ[owned.kind].format(id=owned.id))
        assert mine.status_code == 200, mine.text

    @rule(owned=objects)
    def stranger_uses_it_as_input(self, owned: Owned) -> None:
        """Another tenant's file as a batch's input, or batch as a list cursor, reads as
        one that does not exist."""
        stranger = self.http[1 - owned.owner]
        if owned.kind == "file":
            body = {
                "input_file_id": owned.id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            }
            response = stranger.post("/v1/batches", json=body)
            assert response.status_code == 400
            assert f"no batch file {owned.id!r}" in response.json()["error"]["message"]
        if owned.kind == "batch":
            page = stranger.get("/v1/batches", params={"after": owned.id})
            assert page.status_code == 200 and page.json()["data"] == []

    @invariant()
    def lists_hold_only_own_ids(self) -> None:
        for who, client in enumerate(self.http):
            theirs = self.ids[1 - who]
            for path in LISTS:
                response = client.get(path)
                assert response.status_code == 200, response.text
                listed = {str(item["id"]) for item in response.json()["data"]}
                assert not listed & theirs, f"{path} of tenant {who} lists the other's ids"
                if path == "/v1/webhook-endpoints":
                    urls = {item["url"] for item in response.json()["data"]}
                    assert self.endpoint_urls[who] <= urls <= self.endpoint_urls[who] | {HOOK}


@pytest.fixture
def machine(api_url: str, sessions: sessionmaker[Session]) -> type[TwoTenants]:
    bound = {"api_url": api_url, "sessions": sessions, "attacked": Counter()}
    return type("BoundTwoTenants", (TwoTenants,), bound)


def test_no_sequence_of_calls_reaches_another_tenants_objects(machine: type) -> None:
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=10,
            derandomize=True,
            stateful_step_count=15,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    assert set(machine.attacked) == set(ATTACKS), f"kinds tried: {dict(machine.attacked)}"
