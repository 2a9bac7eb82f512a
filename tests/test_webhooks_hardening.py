"""Webhooks against slow or hostile receivers, and secrets shown once and rotated.

Receivers are real local HTTP servers (``tests.test_webhooks``'s verifying receiver, and
``tests.peers``' tricklers); the sender runs in-process on the session's Postgres, and the
API parts go through the session's API process.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from core import netguard, signing
from core.netguard import HostNotResolved, check_url
from storage.tables import Tenant
from storage.tenants import tenant_for_key
from storage.webhooks import (
    DeliveryStatus,
    ReplayLimited,
    endpoint_for,
    enqueue_delivery,
    reset_for_replay,
    rotate_secret,
)
from tests import test_webhooks as hooks
from tests.conftest import wait_for
from tests.peers import tricklers
from tests.test_webhooks import MakeSender, Receiver, delivery, enqueue

# The verifying receiver and the in-process sender, as tests.test_webhooks builds them.
receiver = hooks.receiver
make_sender = hooks.make_sender


def client_tenant(sessions: sessionmaker[Session], api_key: str) -> uuid.UUID:
    with sessions() as session:
        tenant = tenant_for_key(session, api_key)
    assert isinstance(tenant, Tenant)
    return tenant.id


# --- slow and hostile receivers -------------------------------------------------------------


def test_a_trickling_receiver_is_cut_off_at_the_attempt_deadline(
    sessions: sessionmaker[Session], tenant_id: uuid.UUID, make_sender: MakeSender
) -> None:
    """A byte a second never trips a 10s per-read timeout; the 1.5s total deadline does."""
    with tricklers(1) as [slow]:
        with sessions.begin() as session:
            delivery_id = enqueue_delivery(
                session, tenant_id=tenant_id, url=slow.url, event_type="job.completed", payload={}
            )
        sender = make_sender(webhook_timeout_s=10.0, webhook_deadline_s=1.5)
        assert sender.deliver(delivery_id) is not None  # retried later, like any timeout
        row = delivery(sessions, delivery_id)
        assert (row.status, row.attempts) == (DeliveryStatus.PENDING, 1)
        assert row.last_error == "no complete answer within 1.5s"
        assert slow.connections == 1


def test_an_endpoint_gets_at_most_its_share_of_threads(
    sessions: sessionmaker[Session], tenant_id: uuid.UUID, make_sender: MakeSender
) -> None:
    """With one attempt in flight to an endpoint (cap 1), the next is put off, not attempted."""
    with tricklers(1) as [slow]:
        with sessions.begin() as session:
            ids = [
                enqueue_delivery(
                    session,
                    tenant_id=tenant_id,
                    url=slow.url,
                    event_type="job.completed",
                    payload={},
                )
                for _ in range(2)
            ]
        sender = make_sender(webhook_deadline_s=30.0, webhook_endpoint_concurrency=1)
        first = threading.Thread(target=sender.step, args=(ids[0], 0), daemon=True)
        first.start()
        wait_for(lambda: slow.open == 1, timeout=30, what="the first attempt to be trickled to")
        step = sender.step(ids[1], 0)
        assert step is not None and step.attempt == 0  # same attempt number: none was made
        assert delivery(sessions, ids[1]).attempts == 0
        assert slow.connections == 1
    first.join(60)  # closing the trickler ends the first attempt
    assert not first.is_alive()


def test_a_redirect_is_not_followed_and_counts_as_a_failed_attempt(
    sessions: sessionmaker[Session],
    tenant_id: uuid.UUID,
    receiver: Receiver,
    make_sender: MakeSender,
) -> None:
    with tricklers(1) as [elsewhere]:  # counts whoever connects to it
        receiver.then = (302, {"Location": elsewhere.url})
        delivery_id = enqueue(sessions, tenant_id, receiver)
        assert make_sender().deliver(delivery_id) is not None  # retried, like any non-2xx
        assert elsewhere.connections == 0
    row = delivery(sessions, delivery_id)
    assert (row.status, row.attempts, row.last_status_code) == (DeliveryStatus.PENDING, 1, 302)
    assert row.last_error == "HTTP 302 redirect (not followed)"
    assert len(receiver.hits) == 1


@pytest.fixture
def hung_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """A resolver that never answers until released (a real slow DNS server, in effect)."""
    release = threading.Event()

    def hang(*args: object, **kwargs: object) -> list[object]:
        release.wait(60)
        raise OSError("released")

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    yield release
    release.set()


def test_a_hung_lookup_is_abandoned_at_its_deadline(hung_dns: threading.Event) -> None:
    with pytest.raises(HostNotResolved, match=r"did not resolve within 0\.2s"):
        check_url("https://hooks.example.com/x", allow_private=False, dns_timeout_s=0.2)
    with netguard.deadline(0.1), pytest.raises(HostNotResolved, match=r"within 0\.1s"):
        netguard.resolve("hooks.example.com", 443, timeout_s=5)


# --- replays --------------------------------------------------------------------------------


def test_replay_is_rate_limited(
    client: httpx.Client, api_key: str, sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    delivery_id = enqueue(sessions, client_tenant(sessions, api_key), receiver)
    assert client.post(f"/v1/webhook-deliveries/{delivery_id}/replay").status_code == 202
    again = client.post(f"/v1/webhook-deliveries/{delivery_id}/replay")
    assert again.status_code == 429, again.text
    assert "at most once a minute" in again.json()["detail"]
    assert 1 <= int(again.headers["retry-after"]) <= 60


def test_a_tenant_replays_at_most_its_quota_a_minute(
    sessions: sessionmaker[Session], tenant_id: uuid.UUID, receiver: Receiver
) -> None:
    ids = [enqueue(sessions, tenant_id, receiver) for _ in range(3)]
    for delivery_id in ids[:2]:
        with sessions.begin() as session:
            assert reset_for_replay(session, tenant_id, delivery_id, per_minute=2) is not None
    with sessions.begin() as session, pytest.raises(ReplayLimited, match="limit is 2 a minute"):
        reset_for_replay(session, tenant_id, ids[2], per_minute=2)


# --- secrets --------------------------------------------------------------------------------


def test_a_secret_is_shown_once_and_lists_show_a_hint(client: httpx.Client) -> None:
    url = "https://93.184.216.34/hardening"
    created = client.post("/v1/webhook-endpoints", json={"url": url})
    assert created.status_code == 200, created.text
    secret = created.json()["secret"]
    assert secret.startswith("whsec_")
    assert created.json()["secret_hint"] == signing.secret_hint(secret)
    assert signing.secret_hint(secret).endswith(secret[-4:]) and len(secret) > 40

    again = client.post("/v1/webhook-endpoints", json={"url": url}).json()
    assert again["secret"] is None and again["secret_hint"] == signing.secret_hint(secret)
    [listed] = client.get("/v1/webhook-endpoints").json()["data"]
    assert "secret" not in listed and listed["secret_hint"] == signing.secret_hint(secret)
    assert secret not in client.get("/v1/webhook-endpoints").text


def test_an_endpoint_a_request_created_shows_its_secret_at_registration(
    client: httpx.Client, api_key: str, sessions: sessionmaker[Session]
) -> None:
    url = "https://93.184.216.34/implicit"
    with sessions.begin() as session:  # what a request with webhook_url does
        secret = endpoint_for(session, client_tenant(sessions, api_key), url).secret
    assert client.post("/v1/webhook-endpoints", json={"url": url}).json()["secret"] == secret
    assert client.post("/v1/webhook-endpoints", json={"url": url}).json()["secret"] is None


def test_rotation_signs_with_both_secrets_during_the_grace_period(
    client: httpx.Client,
    api_key: str,
    sessions: sessionmaker[Session],
    receiver: Receiver,
    make_sender: MakeSender,
) -> None:
    tenant = client_tenant(sessions, api_key)
    delivery_id = enqueue(sessions, tenant, receiver)
    old_secret = receiver.secret
    with sessions() as session:
        endpoint_id = endpoint_for(session, tenant, receiver.url).id

    rotated = client.post(f"/v1/webhook-endpoints/{endpoint_id}/rotate-secret")
    assert rotated.status_code == 200, rotated.text
    new_secret = rotated.json()["secret"]
    assert new_secret.startswith("whsec_") and new_secret != old_secret
    assert rotated.json()["previous_secret_until"] is not None
    [listed] = client.get("/v1/webhook-endpoints").json()["data"]
    assert listed["secret_hint"] == signing.secret_hint(new_secret) and "secret" not in listed

    receiver.secret = new_secret  # the receiver switched: deliveries verify with the new one
    assert make_sender().deliver(delivery_id) is None
    [hit] = receiver.hits
    assert hit.problem is None
    signing.verify(old_secret, hit.headers, hit.body)  # and still with the old one, for now

    other_tenant = uuid.uuid4()
    missing = client.post(f"/v1/webhook-endpoints/{other_tenant}/rotate-secret")
    assert missing.status_code == 404


def test_without_a_grace_period_only_the_new_secret_signs(
    sessions: sessionmaker[Session],
    tenant_id: uuid.UUID,
    receiver: Receiver,
    make_sender: MakeSender,
) -> None:
    delivery_id = enqueue(sessions, tenant_id, receiver)
    old_secret = receiver.secret
    with sessions.begin() as session:
        endpoint = endpoint_for(session, tenant_id, receiver.url)
        rotated = rotate_secret(session, tenant_id, endpoint.id, grace_s=0)
        assert rotated is not None
        receiver.secret = rotated.secret
    assert make_sender().deliver(delivery_id) is None
    [hit] = receiver.hits
    assert hit.problem is None
    with pytest.raises(signing.InvalidSignature):
        signing.verify(old_secret, hit.headers, hit.body)
