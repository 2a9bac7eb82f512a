"""Webhook endpoints and deliveries: Postgres records every attempt; Redis only carries ids.

Producers (a finished request, a finished job) call :func:`enqueue_delivery` inside their
own transaction and, after the commit, ``tasks.webhooks.publish_deliveries`` with the ids.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from core.signing import new_secret
from storage.tables import Base, _enum, as_utc, utcnow

REPLAY_WINDOW_S = 60.0


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # gave up: attempts exhausted, or the URL was refused at send time
    DISABLED = "disabled"  # the endpoint answered 410 Gone (now or before)


class WebhookEndpoint(Base):
    """A tenant's receiving URL and the secret its deliveries are signed with.

    The secret is shown once (``secret_shown_at``); after a rotation the previous one keeps
    signing, beside the new one, until ``previous_secret_until``.
    """

    __tablename__ = "webhook_endpoints"
    __table_args__ = (UniqueConstraint("tenant_id", "url", name="uq_webhook_endpoints_tenant_url"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(2048))
    secret: Mapped[str] = mapped_column(String(100))
    # Set when the receiver answers 410 Gone; registering the URL again clears it.
    disabled_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    previous_secret: Mapped[str | None] = mapped_column(String(100))
    previous_secret_until: Mapped[datetime | None]
    secret_shown_at: Mapped[datetime | None]

    def signing_secrets(self, now: datetime) -> tuple[str, ...]:
        """The current secret, then the previous one while its grace period lasts."""
        until = self.previous_secret_until
        if self.previous_secret and until is not None and as_utc(until) > now:
            return (self.secret, self.previous_secret)
        return (self.secret,)


class WebhookDelivery(Base):
    """One event for one endpoint; its id is the ``webhook-id`` the receiver sees."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_tenant_created", "tenant_id", "created_at"),
        Index("ix_webhook_deliveries_tenant_replayed", "tenant_id", "replayed_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    endpoint_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), index=True
    )
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]]
    status: Mapped[DeliveryStatus] = mapped_column(
        _enum(DeliveryStatus, "delivery_status"), default=DeliveryStatus.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]
    replayed_at: Mapped[datetime | None]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """What one attempt needs, read before any HTTP so no transaction is held open."""

    id: uuid.UUID
    endpoint_id: uuid.UUID
    url: str
    secrets: tuple[str, ...]  # sign with each: the current secret first
    event_type: str
    payload: dict[str, Any]
    created_at: datetime
    attempts: int
    endpoint_disabled: bool


def endpoint_for(session: Session, tenant_id: uuid.UUID, url: str) -> WebhookEndpoint:
    """The tenant's endpoint for ``url``, created with a new secret on first use."""
    found = _endpoint(session, tenant_id, url)
    if found is not None:
        return found
    endpoint = WebhookEndpoint(tenant_id=tenant_id, url=url, secret=new_secret())
    try:
        with session.begin_nested():  # a concurrent first use wins; read its row instead
            session.add(endpoint)
    except IntegrityError:
        found = _endpoint(session, tenant_id, url)
        if found is None:
            raise
        return found
    return endpoint


def _endpoint(session: Session, tenant_id: uuid.UUID, url: str) -> WebhookEndpoint | None:
    return session.scalar(
        select(WebhookEndpoint).where(
            WebhookEndpoint.tenant_id == tenant_id, WebhookEndpoint.url == url
        )
    )


def register_endpoint(session: Session, tenant_id: uuid.UUID, url: str) -> WebhookEndpoint:
    """Get or create the endpoint and re-enable it: registering again undoes a 410."""
    endpoint = endpoint_for(session, tenant_id, url)
    endpoint.disabled_at = None
    session.flush()
    return endpoint


def reveal_secret(session: Session, endpoint: WebhookEndpoint) -> str | None:
    """The secret if it was never shown (a new endpoint, or one a request created), else None.

    The update is conditional, so of two concurrent registrations only one sees the secret.
    """
    result = session.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint.id, WebhookEndpoint.secret_shown_at.is_(None))
        .values(secret_shown_at=utcnow())
    )
    return endpoint.secret if result.rowcount else None  # type: ignore[attr-defined]


def rotate_secret(
    session: Session, tenant_id: uuid.UUID, endpoint_id: uuid.UUID, *, grace_s: float
) -> WebhookEndpoint | None:
    """Give the endpoint a new secret; the old one keeps signing too for ``grace_s``.

    A second rotation inside the grace period drops the oldest secret: at most two sign.
    """
    endpoint = session.scalar(
        select(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.tenant_id == tenant_id)
        .with_for_update()
    )
    if endpoint is None:
        return None
    now = utcnow()
    endpoint.previous_secret = endpoint.secret if grace_s > 0 else None
    endpoint.previous_secret_until = now + timedelta(seconds=grace_s) if grace_s > 0 else None
    endpoint.secret = new_secret()
    endpoint.secret_shown_at = now
    session.flush()
    return endpoint


def enqueue_delivery(
    session: Session, *, tenant_id: uuid.UUID, url: str, event_type: str, payload: dict[str, Any]
) -> uuid.UUID:
    """Record a delivery in the caller's transaction and return its id, to publish after commit.

    Args:
        session: The caller's session; nothing is committed here.
        tenant_id: Whose event it is (and whose endpoint ``url`` becomes).
        url: The webhook URL, already checked with ``core.netguard`` when it was given.
        event_type: ``request.completed``, ``job.completed`` or a Batch API event
            (``batch.completed``, ...; see ``storage.openai_files.batch_event``).
        payload: JSON-safe ``data`` of the event (the request or job as the API shows it).

    Returns:
        The delivery id. To a disabled endpoint the row is recorded as ``disabled`` at once.
    """
    endpoint = endpoint_for(session, tenant_id, url)
    delivery = WebhookDelivery(
        endpoint_id=endpoint.id,
        tenant_id=tenant_id,
        event_type=event_type,
        payload=payload,
        status=DeliveryStatus.DISABLED if endpoint.disabled_at else DeliveryStatus.PENDING,
        attempts=0,
    )
    session.add(delivery)
    session.flush()
    return delivery.id


def outgoing(session: Session, delivery_id: uuid.UUID) -> Outgoing | None:
    """The pending delivery with its endpoint, or None when there is nothing left to send."""
    row = session.execute(
        select(WebhookDelivery, WebhookEndpoint)
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
        .where(WebhookDelivery.id == delivery_id)
    ).first()
    if row is None or row[0].status != DeliveryStatus.PENDING:
        return None
    delivery, endpoint = row
    return Outgoing(
        id=delivery.id,
        endpoint_id=endpoint.id,
        url=endpoint.url,
        secrets=endpoint.signing_secrets(utcnow()),
        event_type=delivery.event_type,
        payload=delivery.payload,
        created_at=delivery.created_at,
        attempts=delivery.attempts,
        endpoint_disabled=endpoint.disabled_at is not None,
    )


def record_attempt(
    session: Session,
    delivery_id: uuid.UUID,
    *,
    attempts_before: int,
    status: DeliveryStatus,
    status_code: int | None = None,
    error: str | None = None,
    next_attempt_at: datetime | None = None,
) -> bool:
    """Record one attempt, only if no other attempt (or a replay) was recorded since it began.

    The condition on ``attempts`` fences duplicate task chains (a redelivered message, a
    replay during retries): the loser's write matches nothing and its chain ends.

    Returns:
        Whether this attempt was the one recorded.
    """
    now = utcnow()
    result = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == DeliveryStatus.PENDING,
            WebhookDelivery.attempts == attempts_before,
        )
        .values(
            attempts=attempts_before + 1,
            status=status,
            last_status_code=status_code,
            last_error=error,
            next_attempt_at=next_attempt_at,
            delivered_at=now if status == DeliveryStatus.SUCCEEDED else None,
        )
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def disable_endpoint(session: Session, endpoint_id: uuid.UUID) -> None:
    """The receiver said 410 Gone: send it nothing more until it is registered again."""
    session.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.disabled_at.is_(None))
        .values(disabled_at=utcnow())
    )


def mark_disabled(session: Session, delivery_id: uuid.UUID) -> None:
    """A pending delivery whose endpoint was disabled meanwhile is not sent."""
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == DeliveryStatus.PENDING)
        .values(status=DeliveryStatus.DISABLED, next_attempt_at=None)
    )


def list_endpoints(session: Session, tenant_id: uuid.UUID) -> list[WebhookEndpoint]:
    return list(
        session.scalars(
            select(WebhookEndpoint)
            .where(WebhookEndpoint.tenant_id == tenant_id)
            .order_by(WebhookEndpoint.created_at)
        )
    )


def list_deliveries(session: Session, tenant_id: uuid.UUID, *, limit: int) -> list[WebhookDelivery]:
    """The tenant's most recent deliveries first."""
    return list(
        session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.tenant_id == tenant_id)
            .order_by(WebhookDelivery.created_at.desc())
            .limit(limit)
        )
    )


def get_delivery(
    session: Session, tenant_id: uuid.UUID, delivery_id: uuid.UUID
) -> WebhookDelivery | None:
    """A delivery by id, only if it is this tenant's; another tenant's id reads as absent."""
    return session.scalar(
        select(WebhookDelivery).where(
            WebhookDelivery.id == delivery_id, WebhookDelivery.tenant_id == tenant_id
        )
    )


class EndpointDisabled(Exception):
    """A replay to an endpoint that answered 410; register the URL again first."""


class ReplayLimited(Exception):
    """Too many replays: the message says which limit; ``retry_after`` when to try again."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def reset_for_replay(
    session: Session, tenant_id: uuid.UUID, delivery_id: uuid.UUID, *, per_minute: int
) -> WebhookDelivery | None:
    """Make a delivery pending again with a fresh attempt budget; the caller publishes it.

    Each delivery is replayed at most once a minute and a tenant's deliveries at most
    ``per_minute`` times a minute, so replays cannot turn inferq into a traffic source.

    Raises:
        EndpointDisabled: The endpoint answered 410 Gone and was not registered again since.
        ReplayLimited: One of the two limits is reached.
    """
    delivery = get_delivery(session, tenant_id, delivery_id)
    if delivery is None:
        return None
    now = utcnow()
    _check_replay_limits(session, delivery, now, per_minute=per_minute)
    endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
    if endpoint is not None and endpoint.disabled_at is not None:
        raise EndpointDisabled(
            f"webhook endpoint {endpoint.url} answered 410 Gone and is disabled; "
            "register it again with POST /v1/webhook-endpoints"
        )
    delivery.status = DeliveryStatus.PENDING
    delivery.attempts = 0
    delivery.last_status_code = None
    delivery.last_error = None
    delivery.next_attempt_at = now
    delivery.delivered_at = None
    delivery.replayed_at = now
    session.flush()
    return delivery


def _check_replay_limits(
    session: Session, delivery: WebhookDelivery, now: datetime, *, per_minute: int
) -> None:
    since = now - timedelta(seconds=REPLAY_WINDOW_S)
    if delivery.replayed_at is not None and as_utc(delivery.replayed_at) > since:
        wait = as_utc(delivery.replayed_at) - since
        raise ReplayLimited(
            f"webhook delivery {delivery.id} was replayed less than "
            f"{REPLAY_WINDOW_S:.0f}s ago; each delivery is replayed at most once a minute",
            retry_after=max(1, math.ceil(wait.total_seconds())),
        )
    recent = session.scalar(
        select(func.count())
        .select_from(WebhookDelivery)
        .where(WebhookDelivery.tenant_id == delivery.tenant_id, WebhookDelivery.replayed_at > since)
    )
    if (recent or 0) >= per_minute:
        raise ReplayLimited(
            f"{recent} webhook deliveries were replayed in the last minute; the limit is "
            f"{per_minute} a minute (webhook_replays_per_minute)",
            retry_after=int(REPLAY_WINDOW_S),
        )
