"""Replaying pool items through the normal path: checked as requests to one model, committed
as a bulk job at ``batch`` priority, published, waited for, and their answers read back.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.enums import OPEN_STATUSES, Priority, RequestStatus, TaskKind
from quality.spec import EvalError
from storage.eval_tables import EvalPoolItem
from storage.jobs import cancel
from storage.tables import Job, Request, Tenant, utcnow
from submission.limits import TooBusy
from submission.prepare import BadRequest, Prepared, prepare_many
from submission.request import CreateRequest
from submission.services import Services
from submission.submit import submit_job
from tasks.templates import SamplingIn


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
    """Commit the replay as one bulk job, then publish it (``submission.submit.submit_job``)."""
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
