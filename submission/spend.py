"""A tenant's spending budget at admission: reserve each request's worst-case cost, refuse what
would not fit.

The reservation is the request's own row (``requests.reserved_cost``): while it is open it
counts against the budget at that figure, and once it finishes only its ledger rows count
(``storage.budgets``), which is the settling. A request's worst case is its prompt and the most
it may generate (``max_tokens`` x n) at its model's price per token:

* a hosted model: the configured input and output prices;
* a self-hosted model: what a token cost there over the last hour by the ledger (GPU time
  charged divided by the tokens of the attempts that succeeded), else the model's configured
  ``budget_price_per_million_tokens``, else nothing (only what was spent then holds work back).

Budgets and spend are read from Postgres at most once a second per tenant (a budget's change
takes effect within ``_BUDGET_CACHE_S``); what this process admitted since is counted in, so
several API processes may each admit up to a second's worth past a budget's last cent.
"""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from router.config import HOSTED_ENGINES, ModelSpec
from storage.budgets import Standing, budget_of, cost_per_token, standing
from storage.tables import utcnow

_BUDGET_CACHE_S = 5.0
_SPEND_CACHE_S = 1.0
_PRICE_CACHE_S = 60.0
_PRICE_WINDOW = timedelta(hours=1)

Limits = tuple[float | None, float | None]


class Spend:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._lock = threading.Lock()
        self._budgets: dict[uuid.UUID, tuple[float, Limits]] = {}
        self._standing: dict[uuid.UUID, tuple[float, list[Standing], float]] = {}
        self._prices: dict[str, tuple[float, float | None]] = {}

    def budgeted(self, tenant: uuid.UUID) -> bool:
        return self._limits(tenant) != (None, None)

    def worst_cost(self, spec: ModelSpec, model: str, *, prompt: int, output: int) -> float:
        """The most a request of ``prompt`` tokens generating up to ``output`` may cost."""
        if spec.engine in HOSTED_ENGINES:
            return (
                prompt * spec.price_per_million_input_tokens
                + output * spec.price_per_million_output_tokens
            ) / 1_000_000
        per_token = self._ledger_price(model)
        if per_token is None and spec.budget_price_per_million_tokens is not None:
            per_token = spec.budget_price_per_million_tokens / 1_000_000
        return (prompt + output) * (per_token or 0.0)

    def refusal(self, tenant: uuid.UUID, amount: float) -> tuple[str, int] | None:
        """Why reserving ``amount`` more would break the tenant's budget, and the seconds until
        that period resets; None if it fits (nothing is held here: the row holds it)."""
        limits = self._limits(tenant)
        if limits == (None, None):
            return None
        for state in self._standing_of(tenant, limits):
            if state.spent + state.reserved + amount > state.limit:
                wait = (state.resets_at - utcnow()).total_seconds()
                return _message(state, amount), max(int(wait) + 1, 1)
        return None

    def too_costly(self, tenant: uuid.UUID, amount: float) -> str | None:
        """Why a request costing up to ``amount`` can never fit the tenant's budget, or None."""
        daily, monthly = self._limits(tenant)
        for period, limit in (("daily", daily), ("monthly", monthly)):
            if limit is not None and amount > limit:
                return (
                    f"the request may cost up to {amount:.6g}; the tenant's {period} budget is "
                    f"{limit:.6g}"
                )
        return None

    def count_in(self, tenant: uuid.UUID, amount: float) -> None:
        """Until the next look at the database, count what this process admitted."""
        with self._lock:
            if tenant in self._standing:
                at, states, extra = self._standing[tenant]
                self._standing[tenant] = (at, states, extra + amount)

    def _limits(self, tenant: uuid.UUID) -> Limits:
        with self._lock:
            at, limits = self._budgets.get(tenant, (0.0, (None, None)))
            if time.monotonic() - at < _BUDGET_CACHE_S:
                return limits
        with self._sessions() as session:
            limits = budget_of(session, tenant)
        with self._lock:
            self._budgets[tenant] = (time.monotonic(), limits)
        return limits

    def _standing_of(self, tenant: uuid.UUID, limits: Limits) -> list[Standing]:
        with self._lock:
            at, states, extra = self._standing.get(tenant, (0.0, [], 0.0))
        if time.monotonic() - at >= _SPEND_CACHE_S:
            with self._sessions() as session:
                states = standing(session, tenant, limits)
            extra = 0.0
            with self._lock:
                self._standing[tenant] = (time.monotonic(), states, extra)
        return [_plus(state, extra) for state in states]

    def _ledger_price(self, model: str) -> float | None:
        with self._lock:
            at, price = self._prices.get(model, (0.0, None))
            if time.monotonic() - at < _PRICE_CACHE_S:
                return price
        with self._sessions() as session:
            price = cost_per_token(session, model, utcnow() - _PRICE_WINDOW)
        with self._lock:
            self._prices[model] = (time.monotonic(), price)
        return price


def _plus(state: Standing, extra: float) -> Standing:
    if not extra:
        return state
    return Standing(state.period, state.limit, state.spent, state.reserved + extra, state.resets_at)


def _message(state: Standing, amount: float) -> str:
    resets = _iso(state.resets_at)
    return (
        f"{state.period} budget {state.limit:.6g} would be exceeded: spent {state.spent:.6g}, "
        f"reserved {state.reserved:.6g} for work in flight, and this needs up to {amount:.6g} "
        f"more; it resets at {resets}"
    )


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
