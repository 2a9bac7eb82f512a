"""Choosing a model for a request: a pure function over the models-and-routes config."""

from router.canary import Decision, Verdict, apply_decisions, arm_of
from router.config import ConfigError, ModelSpec, RouterConfig, RouteSpec, load_config
from router.route import Route, RoutingError, route, skip_unavailable

__all__ = [
    "ConfigError",
    "Decision",
    "ModelSpec",
    "Route",
    "RouteSpec",
    "RouterConfig",
    "RoutingError",
    "Verdict",
    "apply_decisions",
    "arm_of",
    "load_config",
    "route",
    "skip_unavailable",
]
