"""Evaluation runs: replay the pool through the normal queues, score, store, notify.

A run submits the pool items of one task kind as a bulk job at ``batch`` priority to the
candidate model (and, when the reference is a model, a second job to it), so the replay goes
through the same API code, Redis queues and workers as production traffic, and interactive
requests are served first (the broker hands out lower priority numbers first). It polls
Postgres until no request of its jobs is open, scores the answers with
:mod:`inferq.quality.scoring`, and writes the run, its items and any ``eval.regression``
webhook delivery in one transaction. Bad input (an unconfigured model, an empty pool, items
without gold labels) is refused before anything is submitted; a replay that runs out of time
is cancelled and stored as a failed run with the reason, never with scores.

References: ``pool`` is the answer production gave (stored, PII-stripped, in the pool),
``gold`` the labels imported with ``inferq eval import-gold``, anything else a configured
model whose answers are taken as right.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.limits import TooBusy
from api.schemas import CreateRequest
from api.service import BadRequest, Prepared, Services, prepare_many, submit_job
from inferq.enums import OPEN_STATUSES, Priority, RequestStatus, TaskKind
from inferq.netguard import UnsafeURL, check_url
from inferq.quality.report import Comparison, compare_run
from inferq.quality.scoring import Scored, score_task
from inferq.settings import Settings
from storage.eval_models import EvalPoolItem, EvalRun, EvalRunItem, EvalRunStatus
from storage.jobs import cancel
from storage.models import Job, Request, Tenant, utcnow
from storage.webhooks import enqueue_delivery
from tasks.templates import SamplingIn
from tasks.webhooks import publish_deliveries

POOL = "pool"
GOLD = "gold"
SCORED_TASKS = (TaskKind.EXTRACT, TaskKind.CLASSIFY, TaskKind.EXPAND)
REGRESSION_EVENT = "eval.regression"

log = logging.getLogger(__name__)


class EvalError(ValueError):
    """The evaluation cannot run as asked; the message names the problem."""


@dataclass(frozen=True, slots=True)
class EvalSpec:
    candidate: str
    reference: str = POOL
    task: TaskKind = TaskKind.EXTRACT
    baseline: bool = False


@dataclass(frozen=True, slots=True)
class RunOutcome:
    run: EvalRun
    comparison: Comparison | None
    seconds: float
    deliveries: list[uuid.UUID]


def check_spec(services: Services, spec: EvalSpec) -> None:
    """Refuse an unconfigured model, a task kind nothing scores or an unsafe webhook URL."""
    models = services.config.models
    for role, name in (("candidate", spec.candidate), ("reference", spec.reference)):
        if name in (POOL, GOLD) and role == "reference":
            continue
        if name not in models:
            raise EvalError(
                f"{role} model {name!r} is not configured; configured: {', '.join(models)}"
            )
    if spec.task not in SCORED_TASKS:
        kinds = ", ".join(t.value for t in SCORED_TASKS)
        raise EvalError(f"task kind {spec.task.value!r} has no scorer; use one of {kinds}")
    if services.settings.eval_webhook_url:
        try:
            check_url(
                services.settings.eval_webhook_url,
                allow_private=services.settings.webhook_allow_private,
            )
        except UnsafeURL as exc:
            raise EvalError(f"INFERQ_EVAL_WEBHOOK_URL: {exc}") from exc


def run_eval(
    services: Services,
    spec: EvalSpec,
    *,
    threshold: float,
    timeout_s: float | None = None,
    echo: Callable[[str], None] = lambda _: None,
) -> RunOutcome:
    """Replay the pool, score the candidate and store the run (see the module docstring).

    Raises:
        EvalError: bad input; nothing was submitted or stored.
    """
    check_spec(services, spec)
    started = time.monotonic()
    with services.sessions() as session:
        items = load_items(session, spec.task, need_gold=spec.reference == GOLD)
    tenant_id = eval_tenant(services)
    models = [m for m in dict.fromkeys([spec.candidate, spec.reference]) if m not in (POOL, GOLD)]
    # Every replay is checked before any is submitted: a refusal leaves nothing running.
    prepared = {m: prepare_replay(services, tenant_id, m, spec.task, items) for m in models}
    jobs = {
        model: submit_replay(services, batch, tenant_id=tenant_id)
        for model, batch in prepared.items()
    }
    echo(f"replaying {len(items)} {spec.task.value} items on {', '.join(jobs)}")
    limit = services.settings.eval_timeout_s if timeout_s is None else timeout_s
    if not wait_done(services, list(jobs.values()), deadline=started + limit):
        reason = f"replay not finished after {limit:.0f}s; cancelled"
        run = store_failed(services, spec, jobs=jobs, reason=reason)
        return RunOutcome(run, None, time.monotonic() - started, [])
    answers = {model: answers_of(services, job_id) for model, job_id in jobs.items()}
    candidates = [answers[spec.candidate].get(item.id) for item in items]
    references = reference_outputs(spec, items, answers)
    try:
        scored = score_task(spec.task, [item.input for item in items], candidates, references)
    except ValueError as exc:  # e.g. the reference model answered nothing
        run = store_failed(services, spec, jobs=jobs, reason=f"nothing to score: {exc}")
        return RunOutcome(run, None, time.monotonic() - started, [])
    outputs = list(zip(candidates, references, strict=True))
    run, comparison, deliveries = store_scored(
        services, spec, items, scored, outputs, jobs=jobs, threshold=threshold, tenant_id=tenant_id
    )
    publish_deliveries(services.celery, deliveries)
    return RunOutcome(run, comparison, time.monotonic() - started, deliveries)


def load_items(session: Session, task: TaskKind, *, need_gold: bool) -> list[EvalPoolItem]:
    """The pool of one task kind, in slot order; refuses an empty pool or missing gold."""
    items = list(
        session.scalars(
            select(EvalPoolItem).where(EvalPoolItem.task == task).order_by(EvalPoolItem.slot)
        )
    )
    if not items:
        raise EvalError(f"the evaluation pool has no {task.value} items")
    if need_gold:
        missing = [item.id for item in items if item.gold is None]
        if missing:
            shown = ", ".join(str(i) for i in missing[:10])
            raise EvalError(
                f"{len(missing)} of {len(items)} {task.value} pool items have no gold label "
                f"(pool ids {shown}{', ...' if len(missing) > 10 else ''}); import them first"
            )
    session.expunge_all()
    return items


def eval_tenant(services: Services) -> uuid.UUID:
    """The tenant replays run as (``eval_tenant``), created on first use."""
    name = services.settings.eval_tenant
    with services.sessions.begin() as session:
        found = session.scalar(select(Tenant.id).where(Tenant.name == name))
        if found is not None:
            return found
        tenant = Tenant(name=name)
        try:
            with session.begin_nested():
                session.add(tenant)
        except IntegrityError:  # a concurrent first use won
            return session.scalars(select(Tenant.id).where(Tenant.name == name)).one()
        return tenant.id


def prepare_replay(
    services: Services,
    tenant_id: uuid.UUID,
    model: str,
    task: TaskKind,
    items: Sequence[EvalPoolItem],
) -> list[Prepared]:
    """Check the items as requests to ``model`` at batch priority, writing nothing.

    The route's fallbacks are dropped: an answer from another model would score the wrong one.
    """
    bodies = [
        CreateRequest.model_construct(
            task=task,
            input=item.input,
            params=SamplingIn(),
            model=model,
            priority=Priority.BATCH,
            idempotency_key=None,
            webhook_url=None,
        )
        for item in items
    ]
    prepared: list[Prepared] = []
    checked = prepare_many(services, tenant_id, bodies)
    for line, (item, result) in enumerate(zip(items, checked, strict=True), 1):
        if isinstance(result, BadRequest):
            raise EvalError(f"pool item {item.id} cannot be replayed on {model}: {result}")
        if result.model != model:
            why = result.route.reason if result.route else None
            raise EvalError(f"model {model!r} is not available now ({why})")
        prepared.append(replace(result, item_id=str(item.id), line=line, route=None))
    if services.limits is not None:
        try:
            services.limits.admit(prepared)
        except TooBusy as exc:
            raise EvalError(f"the queues are too busy for an evaluation now: {exc}") from exc
    return prepared


def submit_replay(
    services: Services, prepared: list[Prepared], *, tenant_id: uuid.UUID
) -> uuid.UUID:
    """Commit the replay as one bulk job, then publish it (``api.service.submit_job``)."""
    job = Job(
        id=uuid.uuid4(),
        tenant_id=tenant_id,
        task=prepared[0].body.task,
        model=prepared[0].model,
        shared={"input": {}, "params": {}, "eval": True},
        total=len(prepared),
    )
    submit_job(services, prepared, job=job)
    return job.id


def wait_done(services: Services, job_ids: list[uuid.UUID], *, deadline: float) -> bool:
    """Poll until no request of the jobs is open; on the deadline cancel them, return False."""
    pause = 0.2
    while True:
        with services.sessions() as session:
            open_ = session.scalar(
                select(func.count())
                .select_from(Request)
                .where(Request.job_id.in_(job_ids), Request.status.in_(OPEN_STATUSES))
            )
        if not open_:
            return True
        if time.monotonic() > deadline:
            with services.sessions.begin() as session:
                for job in session.scalars(select(Job).where(Job.id.in_(job_ids))):
                    cancel(session, job, utcnow())
            return False
        time.sleep(pause)
        pause = min(pause * 1.5, 2.0)


def answers_of(services: Services, job_id: uuid.UUID) -> dict[int, Any]:
    """Pool id -> the job's answer, or None when that request did not succeed."""
    with services.sessions() as session:
        rows = session.execute(
            select(Request.item_id, Request.status, Request.output).where(Request.job_id == job_id)
        )
        return {
            int(item_id): output if status is RequestStatus.SUCCEEDED else None
            for item_id, status, output in rows
        }


def reference_outputs(
    spec: EvalSpec, items: Sequence[EvalPoolItem], answers: dict[str, dict[int, Any]]
) -> list[Any]:
    """The right answer per item; None where a reference model failed (the item is skipped)."""
    if spec.reference == POOL:
        return [item.output for item in items]
    if spec.reference == GOLD:
        return [item.gold for item in items]
    return [answers[spec.reference].get(item.id) for item in items]


def store_scored(
    services: Services,
    spec: EvalSpec,
    items: Sequence[EvalPoolItem],
    scored: Scored,
    outputs: Sequence[tuple[Any, Any]],
    *,
    jobs: dict[str, uuid.UUID],
    threshold: float,
    tenant_id: uuid.UUID,
) -> tuple[EvalRun, Comparison, list[uuid.UUID]]:
    """The run, its items, the baseline mark and a regression delivery, in one transaction."""
    with services.sessions.begin() as session:
        run = EvalRun(
            id=uuid.uuid4(),
            candidate=spec.candidate,
            reference=spec.reference,
            task=spec.task,
            status=EvalRunStatus.SUCCEEDED,
            scores=scored.scores,
            n=scored.n,
            ci_low=scored.ci[0],
            ci_high=scored.ci[1],
            finished_at=utcnow(),
            jobs={model: str(job_id) for model, job_id in jobs.items()},
        )
        session.add(run)
        session.flush()
        ids = [item.id for item in items]
        # A slot replaced since the replay began keeps its item, without the link.
        present = set(session.scalars(select(EvalPoolItem.id).where(EvalPoolItem.id.in_(ids))))
        session.add_all(
            EvalRunItem(
                run_id=run.id,
                pool_id=item.id if item.id in present else None,
                request_id=item.request_id,
                candidate_output=candidate,
                reference_output=reference,
                score=score,
            )
            for item, (candidate, reference), score in zip(
                items, outputs, scored.per_item, strict=True
            )
        )
        if spec.baseline:
            mark_baseline(session, run)
        comparison = compare_run(session, run, threshold=threshold)
        deliveries = notify(services, session, comparison, tenant_id=tenant_id)
        session.flush()
        session.expunge(run)
    return run, comparison, deliveries


def store_failed(
    services: Services, spec: EvalSpec, *, jobs: dict[str, uuid.UUID], reason: str
) -> EvalRun:
    """A failed run keeps its reason and jobs, and no scores or items."""
    with services.sessions.begin() as session:
        run = EvalRun(
            candidate=spec.candidate,
            reference=spec.reference,
            task=spec.task,
            status=EvalRunStatus.FAILED,
            error=reason,
            finished_at=utcnow(),
            jobs={model: str(job_id) for model, job_id in jobs.items()},
        )
        session.add(run)
        session.flush()
        session.expunge(run)
    return run


def mark_baseline(session: Session, run: EvalRun) -> None:
    """Make ``run`` the only baseline of its task kind and reference; it must have succeeded."""
    if run.status is not EvalRunStatus.SUCCEEDED:
        raise EvalError(
            f"run {run.id} is {run.status.value}; only a succeeded run can be a baseline"
        )
    session.execute(
        update(EvalRun)
        .where(EvalRun.task == run.task, EvalRun.reference == run.reference, EvalRun.id != run.id)
        .values(baseline=False)
    )
    run.baseline = True


def notify(
    services: Services, session: Session, comparison: Comparison, *, tenant_id: uuid.UUID
) -> list[uuid.UUID]:
    """Record an ``eval.regression`` delivery when the run regressed and a URL is set."""
    url = services.settings.eval_webhook_url  # checked in check_spec
    if not url or not comparison.regression:
        return []
    delivery = enqueue_delivery(
        session,
        tenant_id=tenant_id,
        url=url,
        event_type=REGRESSION_EVENT,
        payload=comparison.as_event(),
    )
    return [delivery]


def run_scheduled(settings: Settings) -> list[RunOutcome]:
    """What the scheduled task does: each configured candidate on each configured kind.

    A run refused for bad input is logged and the others still run.
    """
    from api.app import build_services

    services = build_services(settings)
    outcomes = []
    try:
        for task in settings.eval_tasks:
            for candidate in settings.eval_candidates:
                spec = EvalSpec(candidate=candidate, reference=settings.eval_reference, task=task)
                try:
                    outcomes.append(run_eval(services, spec, threshold=settings.eval_threshold))
                except EvalError as exc:
                    log.error("scheduled evaluation of %s on %s refused: %s", candidate, task, exc)
    finally:
        services.dispose()
    return outcomes
