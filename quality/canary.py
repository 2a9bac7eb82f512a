"""Judging a canary route: both arms side by side, the decision, and the automatic policy.

Quality comes from evaluation runs, never from the live traffic (whose answers have no
reference): :func:`replay_arms` replays the same pool items through the control and the
candidate model at once, scores both against one reference and stores two ordinary runs
(``inferq eval report`` shows them too). Cost, latency, time to first token, failures and
fallbacks come from the requests each arm took over a window (``storage.canary``).

A decision is a row (``storage.canary``); the API and workers apply it on their next look
(``submission.live_config``). Promotion needs evaluation results for the candidate. The
policy (``canary.auto`` on a route) runs on the maintenance queue every
``canary_policy_interval_s``: it aborts when the candidate's latest run regressed against the
control's by the evaluation rule (``quality.compare.regressed``), promotes when it did not and
the candidate's cost per success is lower with enough successes on both arms, and posts a
signed ``canary.aborted`` / ``canary.promoted`` webhook either way.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.enums import TaskKind
from core.settings import Settings
from quality.compare import RunSummary, regressed
from quality.replay import (
    answers_of,
    eval_tenant,
    load_items,
    prepare_replay,
    submit_replay,
    wait_done,
)
from quality.run_store import store_scored
from quality.scoring import score_task
from quality.spec import GOLD, POOL, SCORED_TASKS, EvalError, EvalSpec
from router import RouterConfig, RouteSpec, Verdict, load_config
from storage.canary import ArmStats, CanaryDecision, arm_stats, latest_decisions, record_decision
from storage.eval_tables import EvalRun, EvalRunItem, EvalRunStatus
from storage.tables import utcnow
from storage.webhooks import enqueue_delivery
from submission.services import Services, build_services
from tasks.eval_schedule import CANARY_TASK
from tasks.queues import FixedQueue
from tasks.webhooks import publish_deliveries

log = logging.getLogger(__name__)
EVENTS = {Verdict.PROMOTE: "canary.promoted", Verdict.ABORT: "canary.aborted"}


class CanaryError(ValueError):
    """The canary command cannot do what was asked; the message says why."""


@dataclass(frozen=True, slots=True)
class Canary:
    """A route's canary as the config file declares it."""

    name: str
    route: RouteSpec
    control: str
    candidate: str
    share: float

    @classmethod
    def of(cls, config: RouterConfig, name: str) -> Canary:
        try:
            _, spec = config.find_route(name)
        except ValueError as exc:
            raise CanaryError(str(exc)) from exc
        if spec.canary is None:
            raise CanaryError(f"route {name!r} has no canary in the config")
        return cls(name, spec, spec.model, spec.canary.model, spec.canary.share)

    def task(self, override: TaskKind | None = None) -> TaskKind:
        """The task kind its quality is judged on: the route's, or ``override`` for ``*``."""
        task = override or (TaskKind.EXTRACT if self.route.task == "*" else self.route.task)
        if self.route.task != "*" and task != self.route.task:
            raise CanaryError(f"route {self.name!r} serves {self.route.task}, not {task.value}")
        if task not in SCORED_TASKS:
            kinds = ", ".join(t.value for t in SCORED_TASKS)
            raise CanaryError(f"task kind {task.value!r} has no scorer; use one of {kinds}")
        return task


@dataclass(frozen=True, slots=True)
class Quality:
    task: TaskKind
    reference: str
    control: RunSummary | None
    candidate: RunSummary | None
    shared_items: int  # pool items both runs scored
    threshold: float

    @property
    def regression(self) -> bool:
        if self.candidate is None:
            return False
        return regressed(self.candidate, self.control, threshold=self.threshold)


@dataclass(frozen=True, slots=True)
class Status:
    canary: Canary
    since: datetime
    arms: dict[str, ArmStats]
    quality: Quality
    decision: CanaryDecision | None  # the latest one on this candidate

    def as_json(self) -> dict[str, Any]:
        def arm(stats: ArmStats) -> dict[str, Any]:
            return {
                "requests": stats.requests,
                "models": stats.models,
                "succeeded": stats.succeeded,
                "failed": stats.failed,
                "open": stats.open,
                "failure_rate": stats.failure_rate,
                "fallback_rate": stats.fallback_rate,
                "cost": stats.cost,
                "cost_per_success": stats.cost_per_success,
                "latency_p50_s": stats.latency_p50_s,
                "latency_p95_s": stats.latency_p95_s,
                "ttft_p50_s": stats.ttft_p50_s,
                "ttft_p95_s": stats.ttft_p95_s,
            }

        def run(summary: RunSummary | None) -> dict[str, Any] | None:
            if summary is None:
                return None
            return {
                "id": summary.id,
                "metric": summary.metric,
                "value": summary.value,
                "ci": [summary.ci_low, summary.ci_high],
                "n": summary.n,
                "created_at": summary.created_at,
            }

        c, q = self.canary, self.quality
        return {
            "route": c.name,
            "control": {"model": c.control, **arm(self.arms["control"]), "quality": run(q.control)},
            "candidate": {
                "model": c.candidate,
                "share": c.share,
                **arm(self.arms["candidate"]),
                "quality": run(q.candidate),
            },
            "since": self.since.isoformat(),
            "task": q.task.value,
            "reference": q.reference,
            "shared_items": q.shared_items,
            "regression": q.regression,
            "decision": None if self.decision is None else self.decision.verdict,
        }


def canary_status(
    services: Services,
    name: str,
    *,
    window: timedelta,
    task: TaskKind | None = None,
    reference: str | None = None,
) -> Status:
    """Both arms of the route's canary (the file's, whatever was decided since)."""
    canary = Canary.of(load_config(services.settings.config), name)
    since = utcnow() - window
    reference = reference or services.settings.eval_reference
    with services.sessions() as session:
        quality = _quality(
            session, canary, canary.task(task), reference, services.settings.eval_threshold
        )
        decision = _decision(session, canary)
        session.expunge_all()
        return Status(canary, since, arm_stats(session, name, since), quality, decision)


def _quality(
    session: Session, canary: Canary, task: TaskKind, reference: str, threshold: float
) -> Quality:
    runs = {
        model: _latest_run(session, model, task, reference)
        for model in (canary.control, canary.candidate)
    }
    control, candidate = runs[canary.control], runs[canary.candidate]
    shared = 0
    if control is not None and candidate is not None:
        items = select(EvalRunItem.request_id).where(EvalRunItem.run_id == control.id)
        shared = len(
            set(session.scalars(items))
            & set(
                session.scalars(
                    select(EvalRunItem.request_id).where(EvalRunItem.run_id == candidate.id)
                )
            )
        )
    return Quality(
        task=task,
        reference=reference,
        control=RunSummary.of(control) if control is not None else None,
        candidate=RunSummary.of(candidate) if candidate is not None else None,
        shared_items=shared,
        threshold=threshold,
    )


def _latest_run(session: Session, model: str, task: TaskKind, reference: str) -> EvalRun | None:
    return session.scalar(
        select(EvalRun)
        .where(
            EvalRun.candidate == model,
            EvalRun.task == task,
            EvalRun.reference == reference,
            EvalRun.status == EvalRunStatus.SUCCEEDED,
        )
        .order_by(EvalRun.created_at.desc())
        .limit(1)
    )


def _decision(session: Session, canary: Canary) -> CanaryDecision | None:
    for row in latest_decisions(session):
        if row.route == canary.name and row.candidate == canary.candidate:
            return row
    return None


def replay_arms(
    services: Services,
    name: str,
    *,
    task: TaskKind | None = None,
    reference: str | None = None,
    timeout_s: float | None = None,
    echo: Callable[[str], None] = lambda _: None,
) -> tuple[RunSummary, RunSummary]:
    """Replay the pool through both arms' models at once; store and return (control, candidate).

    Raises:
        EvalError / CanaryError: bad input, or the replay failed; nothing was stored.
    """
    canary = Canary.of(load_config(services.settings.config), name)
    kind = canary.task(task)
    reference = reference or services.settings.eval_reference
    models = services.config.models
    if reference not in (POOL, GOLD) and reference not in models:
        raise EvalError(f"reference {reference!r} is neither pool, gold nor a configured model")
    started = time.monotonic()
    with services.sessions() as session:
        items = load_items(session, kind, need_gold=reference == GOLD)
    tenant_id = eval_tenant(services)
    arms = [canary.control, canary.candidate]
    replayed = [m for m in dict.fromkeys([*arms, reference]) if m not in (POOL, GOLD)]
    prepared = {m: prepare_replay(services, tenant_id, m, kind, items) for m in replayed}
    jobs = {m: submit_replay(services, batch, tenant_id=tenant_id) for m, batch in prepared.items()}
    echo(f"replaying {len(items)} {kind.value} items on {', '.join(jobs)}")
    limit = services.settings.eval_timeout_s if timeout_s is None else timeout_s
    if not wait_done(services, list(jobs.values()), deadline=started + limit):
        raise CanaryError(f"replay not finished after {limit:.0f}s; cancelled, nothing stored")
    answers = {m: answers_of(services, job) for m, job in jobs.items()}
    if reference == POOL:
        references = [item.output for item in items]
    elif reference == GOLD:
        references = [item.gold for item in items]
    else:
        references = [answers[reference].get(item.id) for item in items]
    summaries = []
    for model in arms:
        outputs = [answers[model].get(item.id) for item in items]
        try:
            scored = score_task(kind, [item.input for item in items], outputs, references)
        except ValueError as exc:
            raise CanaryError(f"nothing to score for {model}: {exc}") from exc
        spec = EvalSpec(candidate=model, reference=reference, task=kind)
        run, _, deliveries = store_scored(
            services,
            spec,
            items,
            scored,
            list(zip(outputs, references, strict=True)),
            jobs=jobs,
            threshold=services.settings.eval_threshold,
            tenant_id=tenant_id,
        )
        publish_deliveries(services.celery, deliveries)
        summaries.append(RunSummary.of(run))
    return summaries[0], summaries[1]


def decide(
    services: Services,
    name: str,
    verdict: Verdict,
    *,
    decided_by: str = "cli",
    reason: str | None = None,
    task: TaskKind | None = None,
    reference: str | None = None,
    webhook_url: str | None = None,
    details: dict[str, Any] | None = None,
) -> CanaryDecision:
    """Record promote or abort of the route's candidate (refused with the reason otherwise).

    With ``webhook_url``, a signed ``canary.promoted`` / ``canary.aborted`` delivery is
    recorded in the same transaction and published after the commit.
    """
    canary = Canary.of(load_config(services.settings.config), name)
    reference = reference or services.settings.eval_reference
    tenant_id = eval_tenant(services) if webhook_url else None
    deliveries: list[uuid.UUID] = []
    with services.sessions.begin() as session:
        done = _decision(session, canary)
        if done is not None:
            raise CanaryError(
                f"{canary.candidate!r} on route {name!r} was already {_past(done.verdict)} "
                f"({done.created_at:%Y-%m-%d %H:%M} UTC by {done.decided_by})"
            )
        if verdict is Verdict.PROMOTE:
            kind = canary.task(task)
            if _latest_run(session, canary.candidate, kind, reference) is None:
                raise CanaryError(
                    f"cannot promote {canary.candidate!r} on route {name!r}: it has no "
                    f"evaluation results on {kind.value} against {reference!r}; run "
                    f"`inferq canary eval {name}` first"
                )
        row = record_decision(
            session,
            route=name,
            candidate=canary.candidate,
            control=canary.control,
            verdict=verdict.value,
            decided_by=decided_by,
            reason=reason,
        )
        if webhook_url and tenant_id is not None:
            payload = {
                "route": name,
                "candidate": canary.candidate,
                "control": canary.control,
                "decision": verdict.value,
                "decided_by": decided_by,
                "reason": reason,
                "status": details,
            }
            event = EVENTS[verdict]
            deliveries.append(
                enqueue_delivery(
                    session, tenant_id=tenant_id, url=webhook_url, event_type=event, payload=payload
                )
            )
        session.expunge(row)
    publish_deliveries(services.celery, deliveries)
    return row


def _past(verdict: str) -> str:
    return "promoted" if verdict == Verdict.PROMOTE else "aborted"


def policy_verdict(status: Status, *, min_successes: int) -> tuple[Verdict | None, str]:
    """What the automatic policy decides from a status, and why (None: not yet)."""
    quality = status.quality
    control, candidate = status.arms["control"], status.arms["candidate"]
    if quality.candidate is None or quality.control is None:
        return None, "no evaluation results for both arms yet"
    if quality.regression:
        drop = quality.control.value - quality.candidate.value
        return Verdict.ABORT, (
            f"quality regressed: {quality.candidate.metric} {quality.candidate.value:.3f} vs "
            f"{quality.control.value:.3f} (drop {drop:.3f} > {quality.threshold:.3f}, outside "
            "the candidate's interval)"
        )
    if min(control.succeeded, candidate.succeeded) < min_successes:
        return None, f"fewer than {min_successes} successes on an arm"
    ours, theirs = candidate.cost_per_success, control.cost_per_success
    assert ours is not None and theirs is not None
    if ours < theirs:
        return Verdict.PROMOTE, (
            f"quality not worse and cost per success {ours:.6g} < {theirs:.6g} of the control"
        )
    return None, f"cost per success {ours:.6g} not below the control's {theirs:.6g}"


def run_policy(services: Services) -> list[CanaryDecision]:
    """Decide every route whose canary has ``auto`` set and is still undecided."""
    config = load_config(services.settings.config)
    decided = []
    for index, spec in enumerate(config.routes):
        if spec.canary is None or spec.canary.auto is None:
            continue
        name = spec.label(index)
        status = canary_status(services, name, window=timedelta(seconds=spec.canary.auto.window_s))
        if status.decision is not None:
            continue
        verdict, why = policy_verdict(status, min_successes=spec.canary.auto.min_successes)
        log.info("canary %s (%s): %s", name, spec.canary.model, why)
        if verdict is None:
            continue
        url = services.settings.canary_webhook_url or services.settings.eval_webhook_url
        row = decide(
            services,
            name,
            verdict,
            decided_by="policy",
            reason=why,
            webhook_url=url or None,
            details=status.as_json(),
        )
        decided.append(row)
    return decided


def register(app: Celery, settings: Settings) -> None:
    """Register the policy task on a process consuming the maintenance queue."""

    @app.task(  # type: ignore[untyped-decorator]
        name=CANARY_TASK,
        queue=FixedQueue.MAINTENANCE.value,
        acks_late=False,
        ignore_result=True,
    )
    def canary_policy() -> None:
        services = build_services(settings)
        try:
            run_policy(services)
        finally:
            services.dispose()
