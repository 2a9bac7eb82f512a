"""The report's spend-against-budget block: each budgeted tenant's day and month so far, what
its open work reserved, and what is left (``storage.budgets``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from inferq.report_data import ReportData, Section
from inferq.report_text import money, table
from storage.budgets import spend_against_budget


def _collect(session: Session, data: ReportData) -> list[dict[str, Any]] | None:
    del data  # budgets run on calendar periods, whatever the report's window
    return spend_against_budget(session) or None


def _render(rows: list[dict[str, Any]], data: ReportData) -> str:
    cur = data.currency
    lines = [["tenant", "period", "budget", "spent", "reserved", "left", "resets (UTC)"]]
    for row in rows:
        lines.append(
            [
                row["tenant"],
                row["period"],
                money(row["budget"], cur),
                money(row["spent"], cur),
                money(row["reserved"], cur),
                money(row["left"], cur),
                row["resets_at"][:16].replace("T", " "),
            ]
        )
    return "Spend against budget\n" + table(lines, left=2)


BUDGETS = Section("budgets", _collect, _render)
