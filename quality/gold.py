"""Importing gold labels: the correct answer for pool items, for ``--reference gold`` runs.

A file is JSON lines ``{"pool_id": 12, "output": ...}`` (``inferq eval pool`` writes the
items with their ids), the output shaped as its item's task kind answers: an object for
``extract``, a label for ``classify``, a list of strings for ``expand``. The whole file is
checked first; any bad line refuses it with every problem listed, and nothing is stored.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.enums import TaskKind
from storage.eval_tables import EvalPoolItem

MAX_LISTED = 10


class GoldError(ValueError):
    """The file is refused; the message lists the bad lines."""


def import_gold(session: Session, data: bytes) -> int:
    """Check every line, then set the items' gold labels in the caller's transaction.

    Returns:
        How many pool items got a label.
    """
    parsed, problems = _read_lines(data)
    if not parsed and not problems:
        raise GoldError("the file has no lines")
    items = {
        item.id: item
        for item in session.scalars(select(EvalPoolItem).where(EvalPoolItem.id.in_(parsed)))
    }
    for pool_id, (number, output) in parsed.items():
        item = items.get(pool_id)
        if item is None:
            problems.append(f"line {number}: pool_id {pool_id} is not in the evaluation pool")
        elif (why := _shape_problem(item.task, output)) is not None:
            problems.append(f"line {number}: {why} for task kind {item.task.value}")
    if problems:
        problems.sort(key=lambda p: int(p.split(":")[0].split()[1]))
        listed = "; ".join(problems[:MAX_LISTED])
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise GoldError(f"{len(problems)} bad line(s), nothing imported: {listed}{more}")
    for pool_id, (_number, output) in parsed.items():
        items[pool_id].gold = output
    session.flush()
    return len(parsed)


def _read_lines(data: bytes) -> tuple[dict[int, tuple[int, Any]], list[str]]:
    """Pool id -> (line number, output) for good lines; a message per bad line."""
    parsed: dict[int, tuple[int, Any]] = {}
    problems: list[str] = []
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        problem, pool_id, output = _parse(raw)
        if problem is None and pool_id in parsed:
            problem = f"pool_id {pool_id} repeats line {parsed[pool_id][0]}"
        if problem is not None:
            problems.append(f"line {number}: {problem}")
            continue
        parsed[pool_id] = (number, output)
    return parsed, problems


def _parse(raw: bytes) -> tuple[str | None, int, Any]:
    try:
        line = json.loads(raw)
    except ValueError as exc:
        return f"not valid JSON: {exc}", 0, None
    if not isinstance(line, dict):
        return "a line must be a JSON object", 0, None
    pool_id = line.get("pool_id")
    if not isinstance(pool_id, int) or isinstance(pool_id, bool):
        return "pool_id must be an integer", 0, None
    if line.get("output") is None:
        return "output is missing", pool_id, None
    return None, pool_id, line["output"]


def _shape_problem(task: TaskKind, output: Any) -> str | None:
    if task is TaskKind.EXTRACT and not isinstance(output, dict):
        return "output must be a JSON object"
    if task is TaskKind.CLASSIFY and not isinstance(output, str):
        return "output must be a label (a string)"
    if task is TaskKind.EXPAND and not (
        isinstance(output, list) and all(isinstance(v, str) for v in output)
    ):
        return "output must be a list of strings"
    return None
