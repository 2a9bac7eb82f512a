"""Webhook handlers: register endpoints, rotate their secrets, inspect and replay deliveries.

A secret is shown once: in the answer that registers its endpoint (or, for an endpoint a
request created with ``webhook_url``, in the first registration), and in the answer of each
rotation. Lists and later registrations show ``secret_hint`` only.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from pydantic import BaseModel, ConfigDict, Field

from api.auth import Caller, services_of
from api.schemas import Problem
from core.netguard import UnsafeURL, check_url
from core.signing import secret_hint
from storage.webhooks import (
    DeliveryStatus,
    EndpointDisabled,
    ReplayLimited,
    WebhookDelivery,
    WebhookEndpoint,
    get_delivery,
    list_deliveries,
    list_endpoints,
    register_endpoint,
    reset_for_replay,
    reveal_secret,
    rotate_secret,
)
from submission.limits import TooBusy
from submission.prepare import BadRequest
from submission.services import Services
from tasks.webhooks import publish_deliveries

router = APIRouter()


class CreateEndpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048)


class EndpointPublic(BaseModel):
    """An endpoint as lists show it: the secret only as a hint (its last characters)."""

    id: uuid.UUID
    url: str
    secret_hint: str
    disabled_at: datetime | None
    created_at: datetime
    # After a rotation, until when the previous secret also signs deliveries.
    previous_secret_until: datetime | None = None

    @classmethod
    def of(cls, row: WebhookEndpoint) -> EndpointPublic:
        return cls(
            id=row.id,
            url=row.url,
            secret_hint=secret_hint(row.secret),
            disabled_at=row.disabled_at,
            created_at=row.created_at,
            previous_secret_until=row.previous_secret_until,
        )


class EndpointSecret(EndpointPublic):
    """A registration or rotation: ``secret`` in full the one time it is shown, else null
    (rotate the secret to get a new one)."""

    secret: str | None

    @classmethod
    def shown(cls, row: WebhookEndpoint, secret: str | None) -> EndpointSecret:
        return cls(**EndpointPublic.of(row).model_dump(), secret=secret)


class EndpointList(BaseModel):
    data: list[EndpointPublic]


class DeliveryPublic(BaseModel):
    id: uuid.UUID
    endpoint_id: uuid.UUID
    event_type: str
    status: DeliveryStatus
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    created_at: datetime
    delivered_at: datetime | None
    payload: dict[str, Any]

    @classmethod
    def of(cls, row: WebhookDelivery) -> DeliveryPublic:
        return cls.model_validate(row, from_attributes=True)


class DeliveryList(BaseModel):
    data: list[DeliveryPublic]


@router.get("/v1/webhook-endpoints")
def list_webhook_endpoints(request: Request, tenant: Caller) -> EndpointList:
    with services_of(request).sessions() as session:
        return EndpointList(data=[EndpointPublic.of(e) for e in list_endpoints(session, tenant.id)])


@router.post("/v1/webhook-endpoints")
def create_webhook_endpoint(
    request: Request, tenant: Caller, body: CreateEndpoint
) -> EndpointSecret:
    """Get or create the endpoint for a URL (re-enabling it after a 410); its secret is in the
    answer the first time only."""
    services = services_of(request)
    settings = services.settings
    try:
        check_url(
            body.url,
            allow_private=settings.webhook_allow_private,
            dns_timeout_s=settings.webhook_dns_timeout_s,
        )
    except UnsafeURL as exc:
        raise BadRequest(f"url: {exc}") from exc
    with services.sessions.begin() as session:
        endpoint = register_endpoint(session, tenant.id, body.url)
        return EndpointSecret.shown(endpoint, reveal_secret(session, endpoint))


@router.post("/v1/webhook-endpoints/{endpoint_id}/rotate-secret")
def rotate_webhook_secret(
    request: Request, tenant: Caller, endpoint_id: uuid.UUID
) -> EndpointSecret:
    """A new secret, shown in this answer only. The old one keeps signing beside it until
    ``previous_secret_until`` (``webhook_rotation_grace_s``), so receivers can switch over."""
    services = services_of(request)
    grace_s = services.settings.webhook_rotation_grace_s
    with services.sessions.begin() as session:
        endpoint = rotate_secret(session, tenant.id, endpoint_id, grace_s=grace_s)
        if endpoint is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no webhook endpoint {endpoint_id}")
        return EndpointSecret.shown(endpoint, endpoint.secret)


@router.get("/v1/webhook-deliveries")
def list_webhook_deliveries(
    request: Request, tenant: Caller, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> DeliveryList:
    with services_of(request).sessions() as session:
        rows = list_deliveries(session, tenant.id, limit=limit)
        return DeliveryList(data=[DeliveryPublic.of(row) for row in rows])


@router.get("/v1/webhook-deliveries/{delivery_id}")
def get_webhook_delivery(
    request: Request, tenant: Caller, delivery_id: uuid.UUID
) -> DeliveryPublic:
    with services_of(request).sessions() as session:
        row = get_delivery(session, tenant.id, delivery_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no webhook delivery {delivery_id}")
    return DeliveryPublic.of(row)


REPLAY_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": Problem, "description": "The endpoint is disabled (it answered 410)."},
    429: {"model": Problem, "description": "Replayed too often; retry after ``Retry-After``."},
}


@router.post(
    "/v1/webhook-deliveries/{delivery_id}/replay",
    status_code=status.HTTP_202_ACCEPTED,
    responses=REPLAY_CONFLICT,
)
def replay_webhook_delivery(
    request: Request, tenant: Caller, delivery_id: uuid.UUID
) -> DeliveryPublic:
    """Send a delivery again, same ``webhook-id``, with a fresh attempt budget."""
    return DeliveryPublic.of(_replay(services_of(request), tenant.id, delivery_id))


def _replay(services: Services, tenant_id: uuid.UUID, delivery_id: uuid.UUID) -> WebhookDelivery:
    per_minute = services.settings.webhook_replays_per_minute
    try:
        with services.sessions.begin() as session:
            row = reset_for_replay(session, tenant_id, delivery_id, per_minute=per_minute)
    except EndpointDisabled as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    except ReplayLimited as exc:
        raise TooBusy(str(exc), retry_after=exc.retry_after) from exc
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no webhook delivery {delivery_id}")
    publish_deliveries(services.celery, [row.id])  # after the commit, never before
    return row
