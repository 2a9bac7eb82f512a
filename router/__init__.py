"""Choosing a model for a request: a pure function over the models-and-routes config."""

from router.config import ConfigError, ModelSpec, RouterConfig, RouteSpec, load_config
from router.route import Route, RoutingError, route, skip_unavailable

__all__ = [
    "ConfigError",
    "ModelSpec",
    "Route",
    "RouteSpec",
    "RouterConfig",
    "RoutingError",
    "load_config",
    "route",
    "skip_unavailable",
]
