"""The scheduled evaluation: a Celery beat entry and the task it sends to the maintenance queue.

``inferq eval beat`` runs the schedule (cron ``INFERQ_EVAL_CRON``, Mondays 03:00 by default);
any ``inferq worker`` runs the task, since every worker consumes the maintenance queue and
registers it (``quality.scheduled``).
"""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

from core.settings import Settings
from tasks.queues import FixedQueue

EVAL_TASK = "inferq.eval.scheduled"
ENTRY = "inferq-eval"
# Canary routes with ``auto`` set are judged this often (``quality.canary.run_policy``).
CANARY_TASK = "inferq.canary.policy"
CANARY_ENTRY = "inferq-canary"


def parse_cron(expr: str) -> crontab:
    """Five cron fields (minute hour day-of-month month day-of-week) as a Celery crontab."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(
            f"INFERQ_EVAL_CRON {expr!r}: expected 5 fields "
            "(minute hour day-of-month month day-of-week)"
        )
    minute, hour, day_of_month, month, day_of_week = fields
    try:
        return crontab(
            minute=minute,
            hour=hour,
            day_of_month=day_of_month,
            month_of_year=month,
            day_of_week=day_of_week,
        )
    except ValueError as exc:
        raise ValueError(f"INFERQ_EVAL_CRON {expr!r}: {exc}") from exc


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The beat entry for these settings (Celery's ``beat_schedule`` format)."""
    return {
        ENTRY: {
            "task": EVAL_TASK,
            "schedule": parse_cron(settings.eval_cron),
            "options": {"queue": FixedQueue.MAINTENANCE.value},
        },
        CANARY_ENTRY: {
            "task": CANARY_TASK,
            "schedule": settings.canary_policy_interval_s,
            "options": {"queue": FixedQueue.MAINTENANCE.value},
        },
    }
