"""Submitting requests: validate, route, insert, commit, and only then publish.

The API handlers and the embedded demo both call :func:`submit`; nothing is written or
enqueued unless every check passed.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from api.limits import Limits
from api.schemas import CreateRequest
from inferq.enums import RequestStatus
from inferq.models import PromptMeter
from inferq.netguard import UnsafeURL, check_url
from inferq.settings import Settings
from router import Route, RouterConfig, RoutingError, route, skip_unavailable
from router.health import ModelHealth
from storage.models import Base, Job, Request, utcnow
from storage.reconcile import forget_publish
from storage.requests import find_by_idempotency_key
from tasks.app import InferqCelery, publish
from tasks.contract import EngineRequest, RunMessage
from tasks.queues import model_queue
from tasks.schema_guard import SchemaLimits
from tasks.templates import render

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    """The request cannot be accepted; the message says why, naming the field."""


@dataclass(frozen=True, slots=True)
class Services:
    """What submitting needs, built once per process and passed in."""

    settings: Settings
    config: RouterConfig
    sessions: sessionmaker[Session]
    celery: InferqCelery
    meters: dict[str, PromptMeter]
    # Cooled-down models and queue depths, for moving down a route's chain at submit.
    health: ModelHealth | None = None
    limits: Limits | None = None  # backpressure; None admits everything

    def dispose(self) -> None:
        """Close the database pool (the broker pool closes with the Celery app)."""
        self.sessions.kw["bind"].dispose()
        if self.health is not None:
            self.health.close()


@dataclass(frozen=True, slots=True)
class Prepared:
    tenant_id: uuid.UUID
    body: CreateRequest
    model: str
    queue: str
    engine_request: EngineRequest
    item_id: str | None = None  # within a job: the caller's id and line
    line: int | None = None
    route: Route | None = None  # the chain still to try, and why it left earlier models
    prompt_tokens: int = 0


# A committed request to publish: its id, its job (if any) and what was prepared for it.
Fresh = tuple[uuid.UUID, uuid.UUID | None, Prepared]


def prepare(services: Services, tenant_id: uuid.UUID, body: CreateRequest) -> Prepared:
    """Every check a request must pass before anything is written."""
    [result] = prepare_many(services, tenant_id, [body])
    if isinstance(result, BadRequest):
        raise result
    return result


def prepare_many(
    services: Services, tenant_id: uuid.UUID, bodies: Sequence[CreateRequest]
) -> list[Prepared | BadRequest]:
    """Check many requests; each comes back prepared or as the error that refuses it.

    Prompt tokens are counted a model at a time, in one tokenizer call.
    """
    why_not = services.health.checker() if services.health is not None else _available
    staged = [_stage(services, tenant_id, body, why_not) for body in bodies]
    by_model: dict[str, list[int]] = {}
    for index, item in enumerate(staged):
        if isinstance(item, Prepared):
            by_model.setdefault(item.model, []).append(index)
    for model, indexes in by_model.items():
        requests = [_prepared(staged[i]).engine_request for i in indexes]
        for index, tokens in zip(indexes, services.meters[model].count_many(requests), strict=True):
            staged[index] = _fits(services, _prepared(staged[index]), tokens)
    return staged


def _prepared(item: Prepared | BadRequest) -> Prepared:
    assert isinstance(item, Prepared)
    return item


def _available(_: Route) -> str | None:
    return None


def _stage(
    services: Services,
    tenant_id: uuid.UUID,
    body: CreateRequest,
    why_not: Callable[[Route], str | None],
) -> Prepared | BadRequest:
    try:
        limits = SchemaLimits(
            services.settings.max_schema_chars, services.settings.max_schema_depth
        )
        engine_request = render(body.task, body.input, body.params, limits=limits)
    except ValidationError as exc:
        return BadRequest(_describe(exc, prefix="input"))
    except ValueError as exc:
        return BadRequest(str(exc))
    try:
        chosen = route(
            body.task,
            body.input,
            tenant=str(tenant_id),
            config=services.config,
            model_override=body.model,
        )
    except RoutingError as exc:
        return BadRequest(str(exc))
    chosen = skip_unavailable(chosen, why_not)
    spec = services.config.models[chosen.model]
    limit = min(services.settings.max_output_tokens, spec.max_model_len - 1)
    if body.params.max_tokens is None:  # the task kind's default, not asked for: fit it
        engine_request.max_tokens = min(engine_request.max_tokens, limit)
    if not 1 <= engine_request.max_tokens <= limit:
        return BadRequest(f"params.max_tokens must be between 1 and {limit} for {chosen.model}")
    if engine_request.n > services.settings.max_n:
        return BadRequest(f"input.n must be at most {services.settings.max_n}")
    if body.webhook_url is not None:
        try:
            check_webhook_url(services.settings, body.webhook_url)
        except BadRequest as exc:
            return exc
    return Prepared(tenant_id, body, chosen.model, chosen.queue, engine_request, route=chosen)


def _fits(services: Services, item: Prepared, prompt_tokens: int) -> Prepared | BadRequest:
    item, prompt_tokens = _longer_context(services, item, prompt_tokens)
    max_model_len = services.config.models[item.model].max_model_len
    max_tokens = item.engine_request.max_tokens
    if prompt_tokens + max_tokens > max_model_len:
        return BadRequest(
            f"prompt is {prompt_tokens} tokens; with max_tokens {max_tokens} it "
            f"exceeds {item.model}'s context of {max_model_len} tokens"
        )
    return replace(item, prompt_tokens=prompt_tokens)


def _longer_context(services: Services, item: Prepared, prompt_tokens: int) -> tuple[Prepared, int]:
    """Move down the route's chain while the prompt does not fit the model's context."""
    max_tokens = item.engine_request.max_tokens
    window = services.config.models[item.model].max_model_len
    while item.route is not None and prompt_tokens + max_tokens > window:
        why = f"prompt of {prompt_tokens} tokens + max_tokens {max_tokens} exceeds its context of "
        following = item.route.next(f"{why}{window}")
        if following is None:
            break
        item = replace(item, model=following.model, queue=following.queue, route=following)
        prompt_tokens = services.meters[item.model].count(item.engine_request)
        window = services.config.models[item.model].max_model_len
    return item, prompt_tokens


def check_webhook_url(settings: Settings, url: str) -> None:
    try:
        check_url(
            url,
            allow_private=settings.webhook_allow_private,
            dns_timeout_s=settings.webhook_dns_timeout_s,
        )
    except UnsafeURL as exc:
        raise BadRequest(f"webhook_url: {exc}") from exc


def submit_many(services: Services, prepared: Sequence[Prepared]) -> list[tuple[Request, bool]]:
    """Insert prepared requests in one transaction, commit, then publish them.

    Returns each request's row and whether it is new (an idempotent replay is not).
    """
    results: list[tuple[Request, bool]] = []
    fresh: list[tuple[uuid.UUID, uuid.UUID | None, Prepared]] = []
    now = utcnow()
    with services.sessions.begin() as session:
        for item in prepared:
            key = item.body.idempotency_key
            existing = find_by_idempotency_key(session, item.tenant_id, key) if key else None
            if existing is not None:
                results.append((existing, False))
                continue
            row = Request(**_row(item, now, job_id=None, deadline_at=None))
            session.add(row)
            results.append((row, True))
            fresh.append((row.id, None, item))
        try:
            session.flush()
        except IntegrityError as exc:  # a concurrent submit with the same idempotency key
            raise BadRequest("idempotency_key is already in use by a request in flight") from exc
    publish_requests(services, fresh)
    return results


def submit_job(
    services: Services,
    prepared: Sequence[Prepared],
    *,
    job: Job,
    extra: Sequence[Base] = (),
    deadline_at: datetime | None = None,
) -> None:
    """Insert a job, its rows and its requests in one transaction, commit, then publish."""
    with services.sessions.begin() as session:
        session.add(job)
        session.add_all(extra)
        session.flush()
        fresh = insert_job_requests(session, prepared, job_id=job.id, deadline_at=deadline_at)
    publish_requests(services, fresh)


def insert_job_requests(
    session: Session,
    prepared: Sequence[Prepared],
    *,
    job_id: uuid.UUID,
    deadline_at: datetime | None,
) -> list[Fresh]:
    """The bulk path: plain multi-row INSERTs rather than ORM objects. Publish after commit."""
    now = utcnow()
    rows = [_row(item, now, job_id=job_id, deadline_at=deadline_at) for item in prepared]
    for start in range(0, len(rows), INSERT_CHUNK):
        session.execute(insert(Request.__table__), rows[start : start + INSERT_CHUNK])
    return [(row["id"], job_id, item) for row, item in zip(rows, prepared, strict=True)]


INSERT_CHUNK = 5000


def _row(
    item: Prepared, now: datetime, *, job_id: uuid.UUID | None, deadline_at: datetime | None
) -> dict[str, Any]:
    return {
        "id": uuid.uuid4(),
        "tenant_id": item.tenant_id,
        "job_id": job_id,
        "item_id": item.item_id,
        "line": item.line,
        "webhook_url": item.body.webhook_url,
        "task": item.body.task,
        "status": RequestStatus.QUEUED,
        "priority": item.body.priority,
        "model": item.model,
        "input": item.body.input,
        "params": item.body.params.stored(),
        "idempotency_key": item.body.idempotency_key,
        "attempts": 0,
        "created_at": now,
        "queued_at": now,
        "published_at": now,
        "deadline_at": deadline_at,
        **_route_columns(item.route),
    }


def _route_columns(chosen: Route | None) -> dict[str, Any]:
    if chosen is None:
        return {"first_model": None, "fallbacks": None, "fallback_reason": None}
    return {
        "first_model": chosen.first_model or chosen.model,
        "fallbacks": list(chosen.fallbacks) or None,
        "fallback_reason": chosen.reason,
    }


def publish_requests(services: Services, fresh: Sequence[Fresh]) -> None:
    """Publish committed requests in bundles per model; a failure leaves them to the
    reconciler, which re-publishes what sits queued past its lease."""
    committed_at = time.time()
    by_model: dict[str, list[RunMessage]] = {}
    for request_id, job_id, item in fresh:
        message = RunMessage(
            request_id=str(request_id),
            tenant_id=str(item.tenant_id),
            model=item.model,
            task=item.body.task,
            priority=item.body.priority,
            engine_request=item.engine_request,
            enqueued_at=committed_at,
            job_id=str(job_id) if job_id else None,
            webhook_url=item.body.webhook_url,
            fallbacks=_route_columns(item.route)["fallbacks"],
            stream=item.body.stream,
        )
        by_model.setdefault(item.model, []).append(message)
    for model, messages in by_model.items():
        queue = model_queue(model)
        try:
            bundle_size = services.config.models[model].max_batch_size
            publish(services.celery, messages, queue=queue, bundle_size=bundle_size)
        except Exception:  # the rows are committed; the reconciler publishes them later
            log.exception("publishing %d requests to %s failed", len(messages), queue)
            _forget_publish(services, [uuid.UUID(m.request_id) for m in messages])


def _forget_publish(services: Services, request_ids: list[uuid.UUID]) -> None:
    """Mark them unpublished, so the reconciler sends them as soon as the broker is back."""
    try:
        with services.sessions.begin() as session:
            forget_publish(session, request_ids)
    except Exception:  # their lease runs out instead
        log.exception("marking %d requests unpublished failed", len(request_ids))


def _describe(exc: ValidationError, *, prefix: str) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in (prefix, *err["loc"]))
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
