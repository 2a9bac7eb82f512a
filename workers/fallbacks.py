"""The worker's side of fallbacks: feed the breaker after each commit.

Fallen-back requests are sent on by the writer after the commit (``tasks.app.publish_by_model``):
a request moves to its next model only once the database says so.
"""

from __future__ import annotations

from collections.abc import Sequence

from inferq.enums import Outcome
from router.health import ModelHealth
from storage.ledger import Attempt


class BreakerHook:
    """A writer commit hook counting one model's failed attempts towards its cool-down."""

    def __init__(self, health: ModelHealth, model: str) -> None:
        self._health = health
        self._model = model

    def __call__(self, attempts: Sequence[Attempt], outcomes: Sequence[Outcome]) -> None:
        del outcomes  # a duplicate still says whether the engine answered
        succeeded = sum(a.succeeded for a in attempts)
        self._health.record(self._model, succeeded=succeeded, failed=len(attempts) - succeeded)
