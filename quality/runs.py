"""Evaluation runs: replay the pool through the normal queues, score, store, notify.

A run submits the pool items of one task kind as a bulk job at ``batch`` priority to the
candidate model (and, when the reference is a model, a second job to it), so the replay goes
through the same submission code, Redis queues and workers as production traffic, and interactive
requests are served first (the broker hands out lower priority numbers first). It polls
Postgres until no request of its jobs is open, scores the answers with
:mod:`quality.scoring`, and writes the run, its items and any ``eval.regression``
webhook delivery in one transaction. Bad input (an unconfigured model, an empty pool, items
without gold labels) is refused before anything is submitted; a replay that runs out of time
is cancelled and stored as a failed run with the reason, never with scores.

References: ``pool`` is the answer production gave (stored, PII-stripped, in the pool),
``gold`` the labels imported with ``inferq eval import-gold``, anything else a configured
model whose answers are taken as right.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from core.netguard import UnsafeURL, check_url
from quality.compare import Comparison
from quality.replay import (
    answers_of,
    eval_tenant,
    load_items,
    prepare_replay,
    submit_replay,
    wait_done,
)
from quality.run_store import store_failed, store_scored
from quality.scoring import score_task
from quality.spec import GOLD, POOL, SCORED_TASKS, EvalError, EvalSpec
from storage.eval_tables import EvalPoolItem, EvalRun
from submission.services import Services
from tasks.webhooks import publish_deliveries


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


def reference_outputs(
    spec: EvalSpec, items: Sequence[EvalPoolItem], answers: dict[str, dict[int, Any]]
) -> list[Any]:
    """The right answer per item; None where a reference model failed (the item is skipped)."""
    if spec.reference == POOL:
        return [item.output for item in items]
    if spec.reference == GOLD:
        return [item.gold for item in items]
    return [answers[spec.reference].get(item.id) for item in items]
