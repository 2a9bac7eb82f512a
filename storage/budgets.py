"""Tenants' spending budgets: what is set, and what counts against it.

A budget caps a tenant's spend per UTC day and per UTC month, in the ledger's currency. What
counts against a period is what the ledger charged the tenant since the period began plus what
its open requests (queued or running) reserved at admission: the most each may cost. A
request's reservation stops counting the moment it leaves the open statuses, in the same
transaction that writes its ledger rows, so settling to the actual cost needs no bookkeeping
of its own.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from core.enums import OPEN_STATUSES, Outcome
from storage.tables import LedgerEntry, Request, Tenant, TenantBudget, utcnow

DAILY, MONTHLY = "daily", "monthly"


@dataclass(frozen=True, slots=True)
class Standing:
    """One period of a tenant's budget, as it stands now."""

    period: str  # daily or monthly
    limit: float
    spent: float  # charged in the ledger since the period began
    reserved: float  # the most its open requests may still cost
    resets_at: datetime

    @property
    def left(self) -> float:
        return self.limit - self.spent - self.reserved

    def as_dict(self) -> dict[str, Any]:
        return {
            "period": self.period,
            "budget": self.limit,
            "spent": self.spent,
            "reserved": self.reserved,
            "left": self.left,
            "resets_at": self.resets_at.isoformat(),
        }


def set_budget(
    session: Session, tenant: Tenant, *, daily: float | None, monthly: float | None
) -> TenantBudget:
    """Set the periods given (None leaves a period as it is); ValueError on a negative amount."""
    for name, amount in ((DAILY, daily), (MONTHLY, monthly)):
        if amount is not None and not (math.isfinite(amount) and amount >= 0):
            raise ValueError(f"{name} budget must be a finite number >= 0, not {amount}")
    row = session.get(TenantBudget, tenant.id)
    if row is None:
        row = TenantBudget(tenant_id=tenant.id)
        session.add(row)
    if daily is not None:
        row.daily = daily
    if monthly is not None:
        row.monthly = monthly
    row.updated_at = utcnow()
    session.flush()
    return row


def clear_budget(session: Session, tenant: Tenant) -> bool:
    """Remove the tenant's budget; False if it had none."""
    row = session.get(TenantBudget, tenant.id)
    if row is None:
        return False
    session.delete(row)
    session.flush()
    return True


def budget_of(session: Session, tenant_id: uuid.UUID) -> tuple[float | None, float | None]:
    """(daily, monthly) limits; (None, None) without a budget."""
    row = session.get(TenantBudget, tenant_id)
    return (None, None) if row is None else (row.daily, row.monthly)


def periods(now: datetime) -> dict[str, tuple[datetime, datetime]]:
    """Each period's start and end (when it resets): UTC day and UTC month."""
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month = day.replace(day=1)
    next_month = (month + timedelta(days=32)).replace(day=1)
    return {DAILY: (day, day + timedelta(days=1)), MONTHLY: (month, next_month)}


def standing(
    session: Session,
    tenant_id: uuid.UUID,
    limits: tuple[float | None, float | None],
    now: datetime | None = None,
) -> list[Standing]:
    """Spend against each period the tenant has a limit for (two aggregate queries)."""
    now = now or utcnow()
    bounds = periods(now)
    day_start, month_start = bounds[DAILY][0], bounds[MONTHLY][0]
    day_spent, month_spent = session.execute(
        select(
            func.coalesce(
                func.sum(case((LedgerEntry.created_at >= day_start, LedgerEntry.cost), else_=0.0)),
                0.0,
            ),
            func.coalesce(func.sum(LedgerEntry.cost), 0.0),
        ).where(LedgerEntry.tenant_id == tenant_id, LedgerEntry.created_at >= month_start)
    ).one()
    reserved = float(
        session.scalar(
            select(func.coalesce(func.sum(Request.reserved_cost), 0.0)).where(
                Request.tenant_id == tenant_id, Request.status.in_(OPEN_STATUSES)
            )
        )
        or 0.0
    )
    spent = {DAILY: float(day_spent), MONTHLY: float(month_spent)}
    return [
        Standing(period, limit, spent[period], reserved, bounds[period][1])
        for period, limit in zip((DAILY, MONTHLY), limits, strict=True)
        if limit is not None
    ]


def find_budget_standing(session: Session, tenant: Tenant) -> list[Standing]:
    """The tenant's standing in each period it has a limit for; empty without a budget."""
    limits = budget_of(session, tenant.id)
    return [] if limits == (None, None) else standing(session, tenant.id, limits)


def spend_against_budget(
    session: Session, now: datetime | None = None, *, tenant: str | None = None
) -> list[dict[str, Any]]:
    """Every budgeted tenant's spend against each of its periods (what ``inferq report``
    shows), or only ``tenant``'s (its name)."""
    query = select(Tenant.id, Tenant.name, TenantBudget.daily, TenantBudget.monthly).join(
        TenantBudget, TenantBudget.tenant_id == Tenant.id
    )
    if tenant is not None:
        query = query.where(Tenant.name == tenant)
    rows = []
    for tenant_id, name, daily, monthly in session.execute(query.order_by(Tenant.name)).all():
        for state in standing(session, tenant_id, (daily, monthly), now):
            rows.append({"tenant": name, **state.as_dict()})
    return rows


def cost_per_token(session: Session, model: str, since: datetime) -> float | None:
    """What a token cost on ``model`` lately, by its ledger (all attempts' cost over the
    tokens of those that succeeded); None without a success in the window."""
    cost, tokens = session.execute(
        select(
            func.sum(LedgerEntry.cost),
            func.sum(
                case(
                    (
                        LedgerEntry.outcome == Outcome.SUCCEEDED,
                        LedgerEntry.prompt_tokens + LedgerEntry.completion_tokens,
                    ),
                    else_=0,
                )
            ),
        ).where(LedgerEntry.model == model, LedgerEntry.created_at >= since)
    ).one()
    if not tokens:
        return None
    return float(cost or 0.0) / int(tokens)
