"""Where a configured model's files are: a folder on disk, or the tiny model built on first use."""

from __future__ import annotations

from pathlib import Path

from core.settings import Settings
from router.config import BUILTIN_TINY
from weights.tiny import ensure_tiny_model


def resolve_model_path(path: str, settings: Settings) -> Path:
    """A config ``path`` as a folder; ``builtin:tiny`` is built offline on first use."""
    if path == BUILTIN_TINY:
        return ensure_tiny_model(settings.model_cache)
    return Path(path).expanduser()
