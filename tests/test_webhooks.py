"""Webhooks: Standard Webhooks signatures, the SSRF guard, and delivery to a real receiver.

The receiver is a real HTTP server on loopback that verifies every signature with
``core.signing.verify``. Delivery runs in-process (the sender alone) or through an
``inferq webhooks`` process on Redis; loopback is allowed there by its setting, while the
session's API process keeps the default and refuses it.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise
from pathlib import Path

import httpx
import pytest
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from core import signing
from core.netguard import GuardedTransport, UnsafeURL, check_url
from core.settings import Settings
from router import load_config
from storage.tables import Tenant
from storage.tenants import tenant_for_key
from storage.webhooks import (
    DeliveryStatus,
    WebhookDelivery,
    endpoint_for,
    enqueue_delivery,
    register_endpoint,
)
from tasks.app import create_celery
from tasks.webhooks import publish_deliveries
from tests.conftest import Process, free_port, service_env, start, stop, wait_for
from workers.webhooks import BACKOFF_CAP_S, MIN_DELAY_S, WebhookSender, retry_after_s

SECRET = signing.new_secret()
BODY = b'{"type":"request.completed","data":{"id":"r1"}}'
PAYLOAD = {"id": "r1", "status": "succeeded", "output": "hello"}
MakeSender = Callable[..., WebhookSender]


# --- a real receiver ------------------------------------------------------------------------


@dataclass
class Hit:
    at: float  # time.monotonic() on arrival
    headers: dict[str, str]
    body: bytes
    problem: str | None  # why verification failed, None when the signature checked out


@dataclass
class Receiver:
    """Answers POSTs from a script of (status, headers), then ``then`` for ever after."""

    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    then: tuple[int, dict[str, str]] = (204, {})
    secret: str = ""
    hits: list[Hit] = field(default_factory=list)
    url: str = ""

    def answer(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str]]:
        try:
            signing.verify(self.secret, headers, body)
            problem = None
        except signing.InvalidSignature as exc:
            problem = str(exc)
        self.hits.append(Hit(time.monotonic(), headers, body, problem))
        index = len(self.hits) - 1
        return self.script[index] if index < len(self.script) else self.then


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            code, extra = state.answer(dict(self.headers.items()), body)
            self.send_response(code)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/inferq"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def make_sender(settings: Settings, sessions: sessionmaker[Session]) -> Iterator[MakeSender]:
    made: list[WebhookSender] = []

    def build(**overrides: object) -> WebhookSender:
        update = {"webhook_allow_private": True, "webhook_timeout_s": 2.0, **overrides}
        sender = WebhookSender(settings.model_copy(update=update), sessions)
        made.append(sender)
        return sender

    yield build
    for sender in made:
        sender.close()


@pytest.fixture(scope="module")
def celery_app(settings: Settings) -> Iterator[Celery]:
    app = create_celery(settings, load_config(settings.config))
    yield app
    app.close()


def run_webhook_worker(
    name: str, settings: Settings, log_dir: Path, **env: str
) -> Iterator[Process]:
    """`inferq webhooks` as a real process, allowed to post to loopback, ready when yielded."""
    env = service_env(settings) | {"INFERQ_WEBHOOK_ALLOW_PRIVATE": "true"} | env
    process = start(name, ["webhooks"], env, log_dir)

    def ready() -> bool:
        if process.proc.poll() is not None:
            pytest.fail(f"webhook worker exited:\n{process.tail()}")
        return "ready." in process.log.read_text(errors="replace")

    wait_for(ready, timeout=60, what="the webhook worker to be ready")
    yield process
    stop(process)


@pytest.fixture(scope="module")
def webhook_worker(settings: Settings, log_dir: Path) -> Iterator[Process]:
    yield from run_webhook_worker("webhooks", settings, log_dir)


def enqueue(sessions: sessionmaker[Session], tenant: uuid.UUID, receiver: Receiver) -> uuid.UUID:
    """Record a delivery to the receiver, committed, and hand the receiver its secret."""
    with sessions.begin() as session:
        delivery_id = enqueue_delivery(
            session,
            tenant_id=tenant,
            url=receiver.url,
            event_type="request.completed",
            payload=PAYLOAD,
        )
        receiver.secret = endpoint_for(session, tenant, receiver.url).secret
    return delivery_id


def delivery(sessions: sessionmaker[Session], delivery_id: uuid.UUID) -> WebhookDelivery:
    with sessions() as session:
        row = session.get(WebhookDelivery, delivery_id)
    assert row is not None
    return row


# --- signing --------------------------------------------------------------------------------


def test_signature_round_trip() -> None:
    signing.verify(SECRET, signing.headers(SECRET, "msg_1", BODY), BODY)


def test_signature_matches_the_standard_webhooks_test_vector() -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    signature = signing.sign(
        secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_tampered_body_or_wrong_secret_is_rejected() -> None:
    headers = signing.headers(SECRET, "msg_1", BODY)
    with pytest.raises(signing.InvalidSignature, match="no webhook-signature matches"):
        signing.verify(SECRET, headers, BODY.replace(b"r1", b"r2"))
    with pytest.raises(signing.InvalidSignature):
        signing.verify(signing.new_secret(), headers, BODY)


def test_old_or_future_timestamp_is_rejected() -> None:
    now = int(time.time())
    for skew in (-301, 301):
        headers = signing.headers(SECRET, "msg_1", BODY, now=now + skew)
        with pytest.raises(signing.InvalidSignature, match="more than 300s"):
            signing.verify(SECRET, headers, BODY, now=now)
    signing.verify(SECRET, signing.headers(SECRET, "msg_1", BODY, now=now - 299), BODY, now=now)


def test_any_of_several_signatures_may_match() -> None:
    headers = signing.headers(SECRET, "msg_1", BODY)
    other = signing.sign(signing.new_secret(), "msg_1", int(headers["webhook-timestamp"]), BODY)
    headers["webhook-signature"] = f"v1,bm90IGl0 {other} {headers['webhook-signature']}"
    signing.verify(SECRET, {k.upper(): v for k, v in headers.items()}, BODY)
    headers["webhook-signature"] = other
    with pytest.raises(signing.InvalidSignature):
        signing.verify(SECRET, headers, BODY)


def test_missing_header_is_named() -> None:
    headers = signing.headers(SECRET, "msg_1", BODY)
    del headers["webhook-timestamp"]
    with pytest.raises(signing.InvalidSignature, match="missing webhook-timestamp"):
        signing.verify(SECRET, headers, BODY)


# --- SSRF guard -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:8080/hook", "loopback"),
        ("http://[::1]/hook", "loopback"),
        ("http://localhost/hook", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://10.1.2.3/", "private"),
        ("https://192.168.0.10/", "private"),
        ("http://169.254.10.1/", "link-local"),
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        ("http://[fd00:ec2::254]/", "metadata"),
        ("http://metadata.google.internal/computeMetadata/v1/", "metadata"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://100.64.0.1/", "not a public address"),
        ("ftp://example.com/", "http or https"),
        ("http:///no-host", "no host"),
    ],
)
def test_unsafe_urls_are_refused(url: str, reason: str) -> None:
    with pytest.raises(UnsafeURL, match=reason):
        check_url(url, allow_private=False)


def test_public_literal_is_accepted_without_a_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_lookups(*args: object, **kwargs: object) -> None:
        raise AssertionError("an IP literal must not be resolved")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookups)
    check_url("http://93.184.216.34/hook", allow_private=False)
    check_url("https://[2606:2800:220:1:248:1893:25c8:1946]:8443/hook", allow_private=False)


def test_allow_private_admits_loopback_but_never_metadata() -> None:
    check_url("http://127.0.0.1:8080/hook", allow_private=True)
    check_url("http://10.1.2.3/hook", allow_private=True)
    with pytest.raises(UnsafeURL, match="metadata"):
        check_url("http://169.254.169.254/", allow_private=True)


def test_transport_refuses_an_unsafe_address_at_connect(receiver: Receiver) -> None:
    """The address actually connected to is checked, whatever was checked before (rebinding)."""
    port = receiver.url.split(":")[2].split("/")[0]
    with httpx.Client(transport=GuardedTransport(allow_private=False), trust_env=False) as http:
        with pytest.raises(UnsafeURL, match="loopback"):
            http.post(f"http://localhost:{port}/")
    assert receiver.hits == []
    with httpx.Client(transport=GuardedTransport(allow_private=True), trust_env=False) as http:
        assert http.post(f"http://localhost:{port}/").status_code == 204
    assert len(receiver.hits) == 1


# --- the sender, in-process -----------------------------------------------------------------


def test_gone_disables_the_endpoint(
    sessions: sessionmaker[Session],
    tenant_id: uuid.UUID,
    receiver: Receiver,
    make_sender: MakeSender,
) -> None:
    receiver.then = (410, {})
    first = enqueue(sessions, tenant_id, receiver)
    queued = enqueue(sessions, tenant_id, receiver)
    sender = make_sender()
    assert sender.deliver(first) is None  # no retry after 410
    row = delivery(sessions, first)
    assert (row.status, row.attempts, row.last_status_code) == (DeliveryStatus.DISABLED, 1, 410)

    assert sender.deliver(queued) is None  # pending before the 410: not sent after it
    row = delivery(sessions, queued)
    assert (row.status, row.attempts) == (DeliveryStatus.DISABLED, 0)
    later = enqueue(sessions, tenant_id, receiver)  # recorded disabled at once
    assert delivery(sessions, later).status == DeliveryStatus.DISABLED
    assert sender.deliver(later) is None
    assert len(receiver.hits) == 1

    with sessions.begin() as session:  # registering the URL again re-enables it
        assert register_endpoint(session, tenant_id, receiver.url).disabled_at is None


def test_gives_up_after_the_attempt_budget(
    sessions: sessionmaker[Session],
    tenant_id: uuid.UUID,
    receiver: Receiver,
    make_sender: MakeSender,
) -> None:
    receiver.then = (500, {})
    delivery_id = enqueue(sessions, tenant_id, receiver)
    sender = make_sender(webhook_max_attempts=3)
    delays = []
    for _ in range(10):  # attempts are made back to back: the delays are only checked
        delay = sender.deliver(delivery_id)
        if delay is None:
            break
        delays.append(delay)
        assert delivery(sessions, delivery_id).next_attempt_at is not None
    assert len(delays) == 2 and all(MIN_DELAY_S <= d <= BACKOFF_CAP_S for d in delays)
    row = delivery(sessions, delivery_id)
    assert (row.status, row.attempts, row.last_status_code) == (DeliveryStatus.FAILED, 3, 500)
    assert row.last_error == "HTTP 500" and row.next_attempt_at is None
    assert len(receiver.hits) == 3 and all(hit.problem is None for hit in receiver.hits)


def test_connection_errors_and_timeouts_are_retried(
    sessions: sessionmaker[Session], tenant_id: uuid.UUID, make_sender: MakeSender
) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers
    try:
        targets = {
            "refused": f"http://127.0.0.1:{free_port()}/",
            "no answer within 0.5s": f"http://127.0.0.1:{silent.getsockname()[1]}/",
        }
        sender = make_sender(webhook_timeout_s=0.5)
        for expected, url in targets.items():
            with sessions.begin() as session:
                delivery_id = enqueue_delivery(
                    session, tenant_id=tenant_id, url=url, event_type="job.completed", payload={}
                )
            assert sender.deliver(delivery_id) is not None
            row = delivery(sessions, delivery_id)
            assert row.status == DeliveryStatus.PENDING and row.attempts == 1
            assert row.last_status_code is None and expected in (row.last_error or "").lower()
    finally:
        silent.close()


def test_send_time_check_refuses_what_is_no_longer_allowed(
    sessions: sessionmaker[Session],
    tenant_id: uuid.UUID,
    receiver: Receiver,
    make_sender: MakeSender,
) -> None:
    delivery_id = enqueue(sessions, tenant_id, receiver)
    assert make_sender(webhook_allow_private=False).deliver(delivery_id) is None
    row = delivery(sessions, delivery_id)
    assert row.status == DeliveryStatus.FAILED and "loopback" in (row.last_error or "")
    assert receiver.hits == []


def test_backoff_grows_with_jitter_and_honours_retry_after(make_sender: MakeSender) -> None:
    sender = make_sender()
    for attempts in range(1, 12):
        ceiling = min(BACKOFF_CAP_S, 2.0 * 2 ** (attempts - 1))
        assert all(MIN_DELAY_S <= sender.backoff(attempts) <= ceiling for _ in range(50))
    assert sender.backoff(3, retry_after=7.0) == 7.0
    assert sender.backoff(3, retry_after=10**9) == BACKOFF_CAP_S
    now = datetime.now(UTC).replace(microsecond=0)
    assert retry_after_s("120", now) == 120.0
    assert retry_after_s(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30.0
    assert retry_after_s("soon", now) is None


# --- end to end: the `inferq webhooks` process and the API ----------------------------------


def test_delivery_is_retried_until_the_receiver_answers(
    sessions: sessionmaker[Session],
    tenant_id: uuid.UUID,
    receiver: Receiver,
    celery_app: Celery,
    webhook_worker: Process,
) -> None:
    receiver.script = [(503, {"Retry-After": "1"})] * 2
    delivery_id = enqueue(sessions, tenant_id, receiver)
    publish_deliveries(celery_app, [delivery_id])

    def delivered() -> bool:
        return delivery(sessions, delivery_id).status != DeliveryStatus.PENDING

    wait_for(delivered, timeout=60, what="the delivery to finish")
    row = delivery(sessions, delivery_id)
    assert (row.status, row.attempts, row.last_status_code) == (DeliveryStatus.SUCCEEDED, 3, 204)
    assert row.delivered_at is not None and row.next_attempt_at is None
    hits = receiver.hits
    assert len(hits) == 3, webhook_worker.tail()
    assert [hit.problem for hit in hits] == [None, None, None]
    assert {hit.headers["webhook-id"] for hit in hits} == {str(delivery_id)}
    gaps = [later.at - earlier.at for earlier, later in pairwise(hits)]
    assert all(gap >= 1.0 for gap in gaps), gaps  # Retry-After: 1 was honoured
    assert b'"type":"request.completed"' in hits[0].body


def test_unsafe_url_is_refused_by_the_api(client: httpx.Client) -> None:
    for url, reason in [
        ("http://127.0.0.1/hook", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        ("file:///etc/passwd", "http or https"),
    ]:
        response = client.post("/v1/webhook-endpoints", json={"url": url})
        assert response.status_code == 422, response.text
        assert reason in response.json()["detail"]
    accepted = client.post("/v1/webhook-endpoints", json={"url": "https://93.184.216.34/hook"})
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["secret"].startswith("whsec_")
    listed = client.get("/v1/webhook-endpoints").json()["data"]
    assert [e["url"] for e in listed] == ["https://93.184.216.34/hook"]


def test_replay_resends_the_same_delivery(
    client: httpx.Client,
    api_key: str,
    sessions: sessionmaker[Session],
    receiver: Receiver,
    celery_app: Celery,
    webhook_worker: Process,
) -> None:
    with sessions() as session:
        tenant = tenant_for_key(session, api_key)
    assert isinstance(tenant, Tenant)
    delivery_id = enqueue(sessions, tenant.id, receiver)
    publish_deliveries(celery_app, [delivery_id])
    wait_for(lambda: len(receiver.hits) == 1, timeout=60, what="the first delivery")

    shown = client.get("/v1/webhook-endpoints").json()["data"]
    hint = signing.secret_hint(receiver.secret)  # the list never shows the secret itself
    assert [(e["url"], e["secret_hint"]) for e in shown] == [(receiver.url, hint)]
    assert all("secret" not in e for e in shown)
    wait_for(
        lambda: client.get(f"/v1/webhook-deliveries/{delivery_id}").json()["status"] == "succeeded",
        timeout=30,
        what="the first delivery to be recorded",
    )
    replayed = client.post(f"/v1/webhook-deliveries/{delivery_id}/replay")
    assert replayed.status_code == 202, replayed.text
    assert (replayed.json()["status"], replayed.json()["attempts"]) == ("pending", 0)

    def redelivered() -> bool:
        return delivery(sessions, delivery_id).status == DeliveryStatus.SUCCEEDED

    wait_for(redelivered, timeout=60, what="the replayed delivery")
    assert len(receiver.hits) == 2 and all(hit.problem is None for hit in receiver.hits)
    assert {hit.headers["webhook-id"] for hit in receiver.hits} == {str(delivery_id)}
    listed = client.get("/v1/webhook-deliveries", params={"limit": 5}).json()["data"]
    assert [(d["id"], d["attempts"]) for d in listed] == [(str(delivery_id), 1)]


def test_other_tenants_deliveries_answer_404(
    client: httpx.Client, sessions: sessionmaker[Session], tenant_id: uuid.UUID, receiver: Receiver
) -> None:
    delivery_id = enqueue(sessions, tenant_id, receiver)  # tenant_id is not the client's tenant
    assert client.get(f"/v1/webhook-deliveries/{delivery_id}").status_code == 404
    assert client.post(f"/v1/webhook-deliveries/{delivery_id}/replay").status_code == 404
    assert client.get("/v1/webhook-deliveries").json()["data"] == []
    assert client.get("/v1/webhook-endpoints").json()["data"] == []
