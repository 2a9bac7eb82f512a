"""The default complexity scorer: a small heuristic in [0, 1], replaceable by config later.

Longer and more structured inputs score higher; the task kind sets a floor, since a chat turn
is usually harder than picking one label.
"""

from __future__ import annotations

import json
from typing import Any

from inferq.enums import TaskKind

_TASK_FLOOR = {
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
