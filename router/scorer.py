"""Complexity scorers: the default heuristic, and loading a replacement named in the config.

The default scores an input in [0, 1]: the task kind sets a floor (a chat turn is usually
harder than picking one label), the input's length as JSON adds up to 0.5 (4,000 characters
or more add all of it) and nesting (more than three objects) adds 0.1. Routes compare the
score with their ``max_complexity``; a config's ``scorer: package.module:function`` replaces
the heuristic with any callable taking ``(task, input)`` and returning a float in [0, 1].
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Callable
from typing import Any

from core.enums import TaskKind

Scorer = Callable[[TaskKind, dict[str, Any]], float]

_TASK_FLOOR = {
    TaskKind.EMBED: 0.1,
    TaskKind.CLASSIFY: 0.1,
    TaskKind.EXPAND: 0.2,
    TaskKind.EXTRACT: 0.3,
    TaskKind.COMPLETE: 0.3,
    TaskKind.CHAT: 0.4,
}
_LONG_INPUT_CHARS = 4000


def score_complexity(task: TaskKind, payload: dict[str, Any]) -> float:
    """Score an input's complexity: task floor plus up to 0.5 for length and 0.1 for nesting."""
    text = json.dumps(payload, ensure_ascii=False)
    length_part = min(len(text) / _LONG_INPUT_CHARS, 1.0) * 0.5
    structure_part = 0.1 if text.count("{") > 3 else 0.0
    return min(_TASK_FLOOR[task] + length_part + structure_part, 1.0)


@functools.lru_cache(maxsize=16)
def load_scorer(path: str) -> Scorer:
    """Import the callable ``path`` names (``module:attr`` or ``module.attr``), once.

    Raises:
        ValueError: it does not import or is not callable; the config loader adds file and key.
    """
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"cannot import scorer {path!r}: {exc}") from exc
    if not callable(found):
        raise ValueError(f"scorer {path!r} is not callable")
    scorer: Scorer = found
    return scorer
