"""The webhook sender: one signed attempt per call, recorded in Postgres.

Each attempt reads the delivery, closes its session, makes the HTTP call, and records the
outcome in a second short transaction, so a slow receiver never holds a database
connection. Only 2xx counts as delivered; 410 Gone disables the endpoint; anything else
(another status, a timeout, a refused connection, a redirect: it is never followed) is
retried with exponential backoff and full jitter, or after the receiver's ``Retry-After``,
until the attempt budget is spent.

Slow or hostile receivers hold a sender thread for at most ``webhook_deadline_s`` per attempt
(connect, send and the answer's headers together; the body is never read), and an endpoint has
at most ``webhook_endpoint_concurrency`` attempts in flight: more wait on the broker, not on a
thread. So a few trickling receivers leave the other threads to everyone else.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy.orm import Session, sessionmaker

from core import signing
from core.netguard import GuardedTransport, HostNotResolved, UnsafeURL, check_url, deadline
from core.settings import Settings
from storage.tables import as_utc, utcnow
from storage.webhooks import (
    DeliveryStatus,
    Outgoing,
    disable_endpoint,
    mark_disabled,
    outgoing,
    record_attempt,
)

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 2.0
# Retries wait in the webhook worker's memory (Celery countdown); keep them well inside the
# broker's visibility timeout.
BACKOFF_CAP_S = 600.0
MIN_DELAY_S = 1.0
USER_AGENT = "inferq-webhooks/0.1"


@dataclass(frozen=True, slots=True)
class AttemptResult:
    status_code: int | None = None
    error: str | None = None
    retry_after_s: float | None = None
    refused: bool = False  # the URL is unsafe now: retrying cannot help

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass(frozen=True, slots=True)
class Step:
    """What the delivery task does next: publish itself again, after ``countdown``, with
    ``attempt`` (unchanged when the endpoint was busy and nothing was attempted)."""

    countdown: float
    attempt: int


class EndpointSlots:
    """Attempts in flight per endpoint in this process, at most ``limit`` each."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._held: Counter[uuid.UUID] = Counter()

    def claim(self, endpoint_id: uuid.UUID) -> bool:
        with self._lock:
            if self._held[endpoint_id] >= self._limit:
                return False
            self._held[endpoint_id] += 1
            return True

    def release(self, endpoint_id: uuid.UUID) -> None:
        with self._lock:
            self._held[endpoint_id] -= 1
            if self._held[endpoint_id] <= 0:
                del self._held[endpoint_id]


class WebhookSender:
    """Sends deliveries by id; built once per webhook worker process and shared by threads."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._sessions = sessions
        self._allow_private = settings.webhook_allow_private
        self._max_attempts = settings.webhook_max_attempts
        self._timeout_s = settings.webhook_timeout_s
        self._deadline_s = settings.webhook_deadline_s
        self._dns_timeout_s = settings.webhook_dns_timeout_s
        self._slots = EndpointSlots(settings.webhook_endpoint_concurrency)
        self._random = rng or random.Random()
        transport = GuardedTransport(
            allow_private=settings.webhook_allow_private,
            dns_timeout_s=settings.webhook_dns_timeout_s,
            # Every thread may hold a connection; the pool must not make them queue.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        self._client = httpx.Client(
            transport=transport,
            timeout=settings.webhook_timeout_s,
            follow_redirects=False,
            trust_env=False,  # an environment proxy would bypass the address check
            headers={"user-agent": USER_AGENT, "content-type": "application/json"},
        )

    def close(self) -> None:
        self._client.close()

    def deliver(self, delivery_id: uuid.UUID, *, attempt: int | None = None) -> float | None:
        """Make one attempt at a pending delivery.

        Args:
            delivery_id: The delivery (and ``webhook-id``).
            attempt: How many attempts the publisher saw recorded; a message from a
                superseded chain (an earlier replay, a redelivery) no longer matches and is
                dropped. None attempts whatever the row holds.

        Returns:
            Seconds to wait before the next attempt, or None when there is none to make.
        """
        item = self._load(delivery_id, attempt)
        if item is None:
            return None
        return self._record(item, self._attempt(item))

    def step(self, delivery_id: uuid.UUID, attempt: int) -> Step | None:
        """:meth:`deliver` within the endpoint's concurrency cap, for the delivery task.

        Returns:
            When and with which attempt number to run again, or None when done.
        """
        item = self._load(delivery_id, attempt)
        if item is None:
            return None
        if not self._slots.claim(item.endpoint_id):  # not an attempt: try again shortly
            return Step(self._random.uniform(MIN_DELAY_S, 2 * MIN_DELAY_S), attempt)
        try:
            delay = self._record(item, self._attempt(item))
        finally:
            self._slots.release(item.endpoint_id)
        return None if delay is None else Step(delay, attempt + 1)

    def _load(self, delivery_id: uuid.UUID, attempt: int | None) -> Outgoing | None:
        with self._sessions() as session:
            item = outgoing(session, delivery_id)
        if item is None or (attempt is not None and item.attempts != attempt):
            return None
        if item.endpoint_disabled:
            with self._sessions.begin() as session:
                mark_disabled(session, item.id)
            return None
        return item

    def _attempt(self, item: Outgoing) -> AttemptResult:
        body = encode_body(item)
        started = time.monotonic()
        try:
            with deadline(self._deadline_s):
                # DNS may have changed since the URL was given.
                check_url(
                    item.url, allow_private=self._allow_private, dns_timeout_s=self._dns_timeout_s
                )
                headers = signing.headers(item.secrets, str(item.id), body)
                with self._client.stream(
                    "POST", item.url, content=body, headers=headers
                ) as response:  # the receiver's body is never read
                    return AttemptResult(
                        status_code=response.status_code,
                        error=None if response.is_success else _problem(response),
                        retry_after_s=retry_after_s(response.headers.get("retry-after"), utcnow()),
                    )
        except HostNotResolved as exc:
            return AttemptResult(error=str(exc))
        except UnsafeURL as exc:
            return AttemptResult(error=f"refused: {exc}", refused=True)
        except httpx.TimeoutException:
            if time.monotonic() - started >= self._deadline_s:
                return AttemptResult(error=f"no complete answer within {self._deadline_s:g}s")
            return AttemptResult(error=f"no answer within {self._timeout_s:g}s")
        except httpx.HTTPError as exc:
            return AttemptResult(error=f"{type(exc).__name__}: {exc}")

    def _record(self, item: Outgoing, result: AttemptResult) -> float | None:
        attempts = item.attempts + 1
        status, delay = self._next_step(result, attempts)
        next_at = utcnow() + timedelta(seconds=delay) if delay is not None else None
        with self._sessions.begin() as session:
            recorded = record_attempt(
                session,
                item.id,
                attempts_before=item.attempts,
                status=status,
                status_code=result.status_code,
                error=result.error,
                next_attempt_at=next_at,
            )
            if recorded and status == DeliveryStatus.DISABLED:
                disable_endpoint(session, item.endpoint_id)
        log.info(
            "webhook %s attempt %d to %s: %s -> %s",
            item.id,
            attempts,
            item.url,
            result.status_code or result.error,
            status if delay is None else f"retry in {delay:.1f}s",
        )
        return delay if recorded else None

    def _next_step(
        self, result: AttemptResult, attempts: int
    ) -> tuple[DeliveryStatus, float | None]:
        if result.ok:
            return DeliveryStatus.SUCCEEDED, None
        if result.status_code == 410:
            return DeliveryStatus.DISABLED, None
        if result.refused or attempts >= self._max_attempts:
            return DeliveryStatus.FAILED, None
        return DeliveryStatus.PENDING, self.backoff(attempts, result.retry_after_s)

    def backoff(self, attempts: int, retry_after: float | None = None) -> float:
        """Seconds before the next try: the receiver's ``Retry-After`` if it sent one, else
        full jitter over an exponential ceiling, so receivers coming back up are not hit by
        every sender at once. Both are capped at ``BACKOFF_CAP_S``."""
        if retry_after is not None:
            return min(retry_after, BACKOFF_CAP_S)
        ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(attempts - 1, 30))
        return max(MIN_DELAY_S, self._random.uniform(0, ceiling))


def _problem(response: httpx.Response) -> str:
    if response.is_redirect:  # following it would send the body where nobody registered
        return f"HTTP {response.status_code} redirect (not followed)"
    return f"HTTP {response.status_code}"


def encode_body(item: Outgoing) -> bytes:
    """The Standard Webhooks envelope: ``type``, ``timestamp`` (of the event), ``data``.

    The Batch API's events (``batch.*``) take OpenAI's event object instead (``id``,
    ``object``, ``type``, ``created_at``, ``data``), which ``client.webhooks.unwrap`` reads.
    """
    envelope: dict[str, object]
    if item.event_type.startswith("batch."):
        envelope = {
            "id": f"evt_{item.id.hex}",
            "object": "event",
            "type": item.event_type,
            "created_at": int(as_utc(item.created_at).timestamp()),
            "data": item.payload,
        }
    else:
        envelope = {
            "type": item.event_type,
            "timestamp": as_utc(item.created_at).isoformat(),
            "data": item.payload,
        }
    return json.dumps(envelope, separators=(",", ":")).encode()


def retry_after_s(value: str | None, now: datetime) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP-date; None if unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - now).total_seconds(), 0.0)
