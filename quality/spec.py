"""What an evaluation is asked to do, and the error that refuses it."""

from __future__ import annotations

from dataclasses import dataclass

from core.enums import TaskKind

POOL = "pool"
GOLD = "gold"
SCORED_TASKS = (TaskKind.EXTRACT, TaskKind.CLASSIFY, TaskKind.EXPAND)


class EvalError(ValueError):
    """The evaluation cannot run as asked; the message names the problem."""


@dataclass(frozen=True, slots=True)
class EvalSpec:
    candidate: str
    reference: str = POOL
    task: TaskKind = TaskKind.EXTRACT
    baseline: bool = False
