"""What makes one bulk line impossible to store or to check, found before anything tries.

A line of a job or a batch file becomes a refused line with its reason, never an exception
that takes its chunk (and every job admitted after it) down with it. These checks name the
shapes that Postgres or Python's recursion would otherwise trip on: values nested deeper than
any real input, ``NaN`` and ``Infinity`` (not JSON), NUL characters (Postgres text refuses
them) and item ids wider than their column. Messages are made printable the same way, since
a refused line's message echoes what the line held.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from typing import Any

from submission.prepare import BadRequest, Prepared, prepare_many
from submission.request import CreateRequest
from submission.services import Services

MAX_DEPTH = 64  # objects and arrays inside each other; a real schema stays far below
MAX_ID_CHARS = 200  # the width of requests.item_id and job_errors.item_id
MAX_MESSAGE_CHARS = 2000


def value_problem(value: Any) -> str | None:
    """Why ``value`` (a parsed line) cannot be stored or checked, or None if it can; the
    reason names where in the line (``body.temperature: ...``).

    Walks the value without recursion, so its own depth cannot exhaust the stack.
    """
    pending: list[tuple[Any, tuple[str, ...]]] = [(value, ())]
    while pending:
        item, path = pending.pop()
        where = f"{'.'.join(path)}: " if path else ""
        if isinstance(item, dict | list):
            if len(path) >= MAX_DEPTH:
                return f"the line is nested more than {MAX_DEPTH} levels deep"
            if isinstance(item, dict):
                if any("\x00" in key for key in item):
                    return f"{where}a key contains a NUL character"
                pending.extend((child, (*path, key)) for key, child in item.items())
            else:
                pending.extend((child, (*path, str(i))) for i, child in enumerate(item))
        elif isinstance(item, str) and "\x00" in item:
            return f"{where}a value contains a NUL character"
        elif isinstance(item, float) and not math.isfinite(item):
            return f"{where}NaN and Infinity are not JSON numbers"
    return None


def id_problem(item_id: str, *, name: str = "id") -> str | None:
    """Why an item's id cannot be kept with its results, or None if it can."""
    if len(item_id) > MAX_ID_CHARS:
        return f"{name} is {len(item_id)} characters; the limit is {MAX_ID_CHARS}"
    if "\x00" in item_id:
        return f"{name} contains a NUL character"
    return None


def printable(text: str) -> str:
    """A message safe to store and show: NUL escaped, length bounded."""
    text = text.replace("\x00", "\\x00")
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 1] + "…"
    return text


def unexpected(exc: BaseException) -> str:
    """The reason given for a line whose check raised something no check foresaw."""
    return printable(f"the line could not be checked ({type(exc).__name__}: {exc})"[:300])


def prepare_each(
    services: Services, tenant_id: uuid.UUID, bodies: Sequence[CreateRequest]
) -> list[Prepared | BadRequest]:
    """:func:`submission.submit.prepare_many`, and where that raises, each body alone: a body that
    raises is refused with the reason. If every one of several bodies raises, the fault is
    not the lines' (a tokenizer that cannot load, say) and the first exception propagates."""
    try:
        return prepare_many(services, tenant_id, bodies)
    except Exception as exc:
        if len(bodies) == 1:
            return [BadRequest(unexpected(exc))]
    results: list[Prepared | BadRequest] = []
    raised: list[Exception] = []
    for body in bodies:
        try:
            [result] = prepare_many(services, tenant_id, [body])
        except Exception as exc:
            raised.append(exc)
            result = BadRequest(unexpected(exc))
        results.append(result)
    if len(raised) == len(bodies):
        raise raised[0]
    return results
