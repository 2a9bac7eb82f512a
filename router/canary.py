"""Canary routes, purely: which arm a request takes, and the config a recorded decision makes.

The arm is a function of (request id, route name) only, so a request keeps its arm when it
is prepared again (a bulk job's retry, a replay) and every API process splits alike. A
decision (``inferq canary promote|abort``) overlays the file's config rather than rewriting
it, and applies only while the route still names the candidate it was made on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from router.config import RouterConfig, RouteSpec

CONTROL = "control"
CANDIDATE = "candidate"


class Verdict(StrEnum):
    PROMOTE = "promote"
    ABORT = "abort"


@dataclass(frozen=True, slots=True)
class Decision:
    route: str
    candidate: str
    verdict: Verdict


def arm_of(request_id: str, route_name: str, share: float) -> str:
    """``candidate`` for about ``share`` of request ids, ``control`` for the rest.

    The first 8 bytes of SHA-256 over the route's name and the id, as a fraction of 2**64:
    uniform, stable per id, and independent between routes.
    """
    digest = hashlib.sha256(f"{route_name}\0{request_id}".encode()).digest()
    return CANDIDATE if int.from_bytes(digest[:8], "big") < share * 2**64 else CONTROL


def candidate_chain(spec: RouteSpec) -> tuple[str, tuple[str, ...]]:
    """The candidate arm's model and fallbacks: the candidate, then the route's fallbacks."""
    assert spec.canary is not None
    candidate = spec.canary.model
    return candidate, tuple(name for name in spec.fallbacks if name != candidate)


def apply_decisions(config: RouterConfig, decisions: Iterable[Decision]) -> RouterConfig:
    """The config with recorded decisions applied: promoted, the route's model becomes the
    candidate; aborted, the canary goes. A decision on a candidate the route no longer names
    is ignored."""
    latest = {d.route: d for d in decisions}
    routes = []
    changed = False
    for index, spec in enumerate(config.routes):
        decision = latest.get(spec.label(index))
        if decision is None or spec.canary is None or spec.canary.model != decision.candidate:
            routes.append(spec)
            continue
        changed = True
        if decision.verdict is Verdict.PROMOTE:
            model, fallbacks = candidate_chain(spec)
            update = {"model": model, "fallbacks": fallbacks, "canary": None}
        else:
            update = {"canary": None}
        # Named after the file's route, so the name stays what the operator typed.
        routes.append(spec.model_copy(update={**update, "name": spec.label(index)}))
    return config.model_copy(update={"routes": tuple(routes)}) if changed else config
