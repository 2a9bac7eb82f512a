"""The scheduled evaluation: what its task runs, and registering the task.

``inferq eval beat`` sends the task (``tasks.eval_schedule``); the processes that consume the
maintenance queue (``inferq worker``, the embedded workers) register it here. The task is
acknowledged on receipt, not late: a run takes longer than the broker's visibility timeout may
allow, and a redelivered message would start a second run. A run lost with its worker is simply
taken again at the next date.
"""

from __future__ import annotations

import logging

from celery import Celery

from core.settings import Settings
from quality import canary
from quality.runs import RunOutcome, run_eval
from quality.spec import EvalError, EvalSpec
from submission.services import build_services
from tasks.eval_schedule import EVAL_TASK
from tasks.queues import FixedQueue

log = logging.getLogger(__name__)


def register(app: Celery, settings: Settings) -> None:
    """Register the scheduled evaluation task on a consuming process's app."""

    @app.task(  # type: ignore[untyped-decorator]
        name=EVAL_TASK,
        queue=FixedQueue.MAINTENANCE.value,
        acks_late=False,
        ignore_result=True,
    )
    def scheduled_eval() -> None:
        run_scheduled(settings)

    canary.register(app, settings)


def run_scheduled(settings: Settings) -> list[RunOutcome]:
    """What the scheduled task does: each configured candidate on each configured kind.

    A run refused for bad input is logged and the others still run.
    """
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
