"""Every check a request must pass before anything is written: its input renders, a model is
routed (down the chain past models cooling down, too busy or too short for the prompt), its
tokens fit, its webhook URL is safe. Nothing here writes or publishes.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import kombu.exceptions
import redis
from celery import Celery
from pydantic import ValidationError

from core.enums import TaskKind
from core.netguard import UnsafeURL, check_url
from core.settings import Settings
from router import Route, RoutingError, route, skip_unavailable
from router.config import model_kind_problem
from submission.request import CreateRequest
from submission.services import Services
from tasks.breaker import Breaker
from tasks.contract import EngineRequest
from tasks.queues import queue_depths
from tasks.schema_guard import SchemaLimits
from tasks.templates import render

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    """The request cannot be accepted; the message says why, naming the field."""


@dataclass(frozen=True, slots=True)
class Prepared:
    tenant_id: uuid.UUID
    body: CreateRequest
    model: str
    engine_request: EngineRequest
    item_id: str | None = None  # within a job: the caller's id and line
    line: int | None = None
    route: Route | None = None  # the chain still to try, and why it left earlier models
    prompt_tokens: int = 0
    # Chosen here, before routing: a canary route splits its traffic by request id.
    request_id: uuid.UUID = field(default_factory=uuid.uuid4)
    # The most it may cost, reserved against its tenant's spending budget (None: no budget).
    reserved_cost: float | None = None


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
    why_not = availability(services.breaker, services.celery)
    staged = [_stage(services, tenant_id, body, why_not) for body in bodies]
    by_model: dict[str, list[int]] = {}
    for index, item in enumerate(staged):
        if isinstance(item, Prepared):
            by_model.setdefault(item.model, []).append(index)
    for model, indexes in by_model.items():
        requests = [_prepared(staged[i]).engine_request for i in indexes]
        for index, tokens in zip(indexes, services.meters[model].count_many(requests), strict=True):
            staged[index] = _fits(services, _prepared(staged[index]), tokens)
    if services.limits is not None:
        limits = services.limits
        staged = [
            limits.priced(item, services.config) if isinstance(item, Prepared) else item
            for item in staged
        ]
    return staged


def _prepared(item: Prepared | BadRequest) -> Prepared:
    assert isinstance(item, Prepared)
    return item


def availability(breaker: Breaker | None, celery: Celery) -> Callable[[Route], str | None]:
    """Why a route's model should not take a request now, or None: cooling down after
    failing too often, or more messages waiting than the route allows.

    Answers are kept for the checker's life, so a bulk job of many lines costs one look per
    model; make one per submission. Without an answer from the broker, a route is taken as
    configured (the commit decides).
    """
    answers: dict[tuple[str, int | None], str | None] = {}

    def why_not(chosen: Route) -> str | None:
        key = (chosen.model, chosen.max_queue_depth)
        if key not in answers:
            try:
                answers[key] = _why_not(breaker, celery, chosen.model, chosen.max_queue_depth)
            except (redis.RedisError, kombu.exceptions.OperationalError):
                log.warning("no health for %s from the broker", chosen.model, exc_info=True)
                answers[key] = None
        return answers[key]

    return why_not


def _why_not(
    breaker: Breaker | None, celery: Celery, model: str, max_queue_depth: int | None
) -> str | None:
    if breaker is not None and breaker.cooled(model):
        return "cooling down after repeated failures"
    if max_queue_depth is not None:
        depth = queue_depths(celery, [model])[model]
        if depth > max_queue_depth:
            return f"queue depth {depth} over the route's {max_queue_depth}"
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
    request_id = uuid.uuid4()
    try:
        chosen = route(
            body.task,
            body.input,
            tenant=str(tenant_id),
            config=services.config,
            model_override=body.model,
            request_id=str(request_id),
        )
    except RoutingError as exc:
        return BadRequest(str(exc))
    chosen = skip_unavailable(chosen, why_not)
    if services.limits is not None:  # a model that would start it too late hands it on
        chosen = services.limits.in_time(chosen, deadline_s=body.deadline_s, priority=body.priority)
    problem = _unfit(services, body, chosen.model, engine_request)
    if problem is not None:
        return BadRequest(problem)
    if body.webhook_url is not None:
        try:
            check_webhook_url(services.settings, body.webhook_url)
        except BadRequest as exc:
            return exc
    return Prepared(
        tenant_id, body, chosen.model, engine_request, route=chosen, request_id=request_id
    )


def _unfit(
    services: Services, body: CreateRequest, model: str, engine_request: EngineRequest
) -> str | None:
    """Why the chosen model cannot run this request as asked, or None; a default
    ``max_tokens`` (not asked for) is shrunk to fit the model instead."""
    spec = services.config.models[model]
    # Routes are by task kind and may end on a model of the other kind: say so now, not
    # after a worker failed it max_attempts times.
    wrong_kind = model_kind_problem(spec, model, embedding=body.task is TaskKind.EMBED)
    if wrong_kind is not None:
        return f"task {body.task.value!r}: {wrong_kind}"
    limit = min(services.settings.max_output_tokens, spec.max_model_len - 1)
    if body.params.max_tokens is None:  # the task kind's default, not asked for: fit it
        engine_request.max_tokens = min(engine_request.max_tokens, limit)
    if not 1 <= engine_request.max_tokens <= limit:
        return f"params.max_tokens must be between 1 and {limit} for {model}"
    if engine_request.n > services.settings.max_n:
        return f"input.n must be at most {services.settings.max_n}"
    return None


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
        item = replace(item, model=following.model, route=following)
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


def _describe(exc: ValidationError, *, prefix: str) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in (prefix, *err["loc"]))
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
