"""What Postgres will refuse, refused first: NUL in text and NaN or Infinity in JSON.

Python's JSON reader takes ``NaN``, ``Infinity`` and ``"\\u0000"``; Postgres refuses NUL in a
text column and non-finite numbers in a JSON column. Such a value would otherwise fail the
whole group commit it joined (``api.committer``), and its neighbours with it. Both request
shapes (native and OpenAI) call :func:`check_storable` on everything that becomes a row.
"""

from __future__ import annotations

import math
from typing import Any


def storable_problem(value: Any, where: str, *, finite: bool = True) -> str | None:
    """Why ``value`` cannot be stored, naming the first offending field, or None.

    Walks with an explicit stack: nesting depth is limited elsewhere, not by recursion here.

    Args:
        value: JSON-like data (dicts, lists, strings, numbers).
        where: The path to name in the message ("" at the top).
        finite: Also refuse NaN and Infinity (off where another check already names them).
    """
    stack: list[tuple[str, Any]] = [(where, value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return f"{path}: contains a NUL character (\\u0000), which cannot be stored"
        elif isinstance(item, float):
            if finite and not math.isfinite(item):
                return f"{path}: NaN and Infinity are not JSON numbers"
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                child_path = f"{path}.{key}" if path else str(key)
                if isinstance(key, str) and "\x00" in key:
                    return f"{child_path}: a key contains a NUL character, which cannot be stored"
                stack.append((child_path, child))
        elif isinstance(item, list | tuple):
            stack.extend(
                (f"{path}.{i}" if path else str(i), v) for i, v in reversed(list(enumerate(item)))
            )
    return None


def check_storable(value: Any, where: str = "", *, finite: bool = True) -> None:
    """Raise ``ValueError`` (a 4xx naming the field, in a pydantic validator) for
    :func:`storable_problem`."""
    problem = storable_problem(value, where, finite=finite)
    if problem is not None:
        raise ValueError(problem)
