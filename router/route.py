"""(task kind, input, tenant, config) -> Route. No I/O, no state.

Moving down a route's fallback chain is pure too: :func:`skip_unavailable` asks a callable
why a model cannot take work now (cooling down, queue too deep, context too short) and
records each reason on the route it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from core.enums import TaskKind
from router.canary import CANDIDATE, arm_of, candidate_chain
from router.config import RouterConfig


class RoutingError(ValueError):
    """No configured model can take this request."""


@dataclass(frozen=True, slots=True)
class Route:
    model: str
    fallbacks: tuple[str, ...]
    complexity: float
    max_queue_depth: int | None = None
    # Set once the request moved down the chain: the model it was routed to, and why it left.
    first_model: str | None = None
    reason: str | None = None
    # On a canary route: the route's name and the arm taken (``control`` or ``candidate``).
    canary_route: str | None = None
    canary_arm: str | None = None

    def next(self, why: str) -> Route | None:
        """This route one step down its chain, ``why`` recorded; None at the chain's end."""
        if not self.fallbacks:
            return None
        model = self.fallbacks[0]
        step = f"{self.model}: {why}"
        return replace(
            self,
            model=model,
            fallbacks=self.fallbacks[1:],
            first_model=self.first_model or self.model,
            reason=step if self.reason is None else f"{self.reason}; {step}",
        )


def route(
    task: TaskKind,
    payload: dict[str, Any],
    *,
    tenant: str,
    config: RouterConfig,
    model_override: str | None = None,
    request_id: str | None = None,
) -> Route:
    """Pick the model to try first and its fallback chain.

    Args:
        task: The request's task kind.
        payload: The request's input, scored for complexity.
        tenant: The caller; routes per tenant arrive with the routing issue.
        config: The validated models-and-routes config.
        model_override: A model the caller named; it must be configured.
        request_id: The request's id; on a canary route it picks the arm
            (:func:`router.canary.arm_of`). Without one the control arm serves.
    """
    del tenant  # part of the contract; no tenant-specific routes yet
    complexity = config.score(task, payload)
    if model_override is not None:
        if model_override not in config.models:
            known = ", ".join(sorted(config.models))
            raise RoutingError(f"unknown model {model_override!r}; configured: {known}")
        return Route(model_override, (), complexity)
    for index, spec in enumerate(config.routes):
        if spec.task in (task, "*") and complexity <= spec.max_complexity:
            chosen = Route(spec.model, spec.fallbacks, complexity, spec.max_queue_depth)
            if spec.canary is None or request_id is None:
                return chosen
            name = spec.label(index)
            arm = arm_of(request_id, name, spec.canary.share)
            if arm == CANDIDATE:
                model, fallbacks = candidate_chain(spec)
                chosen = replace(chosen, model=model, fallbacks=fallbacks)
            return replace(chosen, canary_route=name, canary_arm=arm)
    raise RoutingError(f"no route for task {task.value!r} at complexity {complexity:.2f}")


def skip_unavailable(chosen: Route, why_not: Callable[[Route], str | None]) -> Route:
    """Walk down the chain past models that cannot take the request now.

    The last model of the chain takes it whatever its state: a cooled-down or busy model
    still serves, later, where there is nothing else to try.
    """
    while chosen.fallbacks and (why := why_not(chosen)) is not None:
        chosen = chosen.next(why) or chosen
    return chosen
