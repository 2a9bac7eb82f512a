"""Feed the circuit breaker after each commit (``tasks.breaker``).

Requests that fell back are sent on by the writer after the commit (``tasks.app.publish_runs``):
a request moves to its next model only once the database says so.
"""

from __future__ import annotations

from collections.abc import Sequence

from core.enums import Outcome
from storage.ledger import Attempt
from tasks.breaker import Breaker


class BreakerHook:
    """A writer commit hook counting one model's failed attempts towards its cool-down."""

    def __init__(self, breaker: Breaker, model: str) -> None:
        self._breaker = breaker
        self._model = model

    def __call__(self, attempts: Sequence[Attempt], outcomes: Sequence[Outcome]) -> None:
        del outcomes  # a duplicate still says whether the engine answered
        succeeded = sum(a.succeeded for a in attempts)
        self._breaker.record(self._model, succeeded=succeeded, failed=len(attempts) - succeeded)
