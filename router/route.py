"""(task kind, input, tenant, config) -> Route. No I/O, no state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inferq.enums import TaskKind
from router.config import RouterConfig
from router.scorer import score_complexity
from tasks.queues import model_queue


class RoutingError(ValueError):
    """No configured model can take this request."""


@dataclass(frozen=True, slots=True)
class Route:
    model: str
    fallbacks: tuple[str, ...]
    queue: str
    complexity: float


def route(
    task: TaskKind,
    payload: dict[str, Any],
    *,
    tenant: str,
    config: RouterConfig,
    model_override: str | None = None,
) -> Route:
    """Pick the model to try first, its fallback chain and the queue to publish on.

    Args:
        task: The request's task kind.
        payload: The request's input, scored for complexity.
        tenant: The caller; routes per tenant arrive with the routing issue.
        config: The validated models-and-routes config.
        model_override: A model the caller named; it must be configured.
    """
    del tenant  # part of the contract; no tenant-specific routes yet
    complexity = score_complexity(task, payload)
    if model_override is not None:
        if model_override not in config.models:
            known = ", ".join(sorted(config.models))
            raise RoutingError(f"unknown model {model_override!r}; configured: {known}")
        return Route(model_override, (), model_queue(model_override), complexity)
    for spec in config.routes:
        if spec.task in (task, "*") and complexity <= spec.max_complexity:
            return Route(spec.model, spec.fallbacks, model_queue(spec.model), complexity)
    raise RoutingError(f"no route for task {task.value!r} at complexity {complexity:.2f}")
