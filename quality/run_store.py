"""Storing an evaluation run: a scored run with its items, its comparison and any
``eval.regression`` delivery in one transaction; a failed run with its reason; the baseline mark.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from quality.compare import Comparison, compare_run
from quality.scoring import Scored
from quality.spec import EvalError, EvalSpec
from storage.eval_tables import EvalPoolItem, EvalRun, EvalRunItem, EvalRunStatus
from storage.tables import utcnow
from storage.webhooks import enqueue_delivery
from submission.services import Services

REGRESSION_EVENT = "eval.regression"


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
