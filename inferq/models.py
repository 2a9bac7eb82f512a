"""Where a configured model's files are, and how many tokens a prompt costs on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inferq.settings import Settings
from router.config import BUILTIN_TINY
from tasks.contract import EngineRequest


def resolve_model_path(path: str, settings: Settings) -> Path:
    """A config ``path`` as a folder; ``builtin:tiny`` is built offline on first use."""
    if path == BUILTIN_TINY:
        from inferq.tiny_model import ensure_tiny_model

        return ensure_tiny_model(settings.model_cache)
    return Path(path).expanduser()


class PromptMeter:
    """Counts prompt tokens as the engine will, so over-long prompts are refused up front."""

    def __init__(self, model_path: Path) -> None:
        from transformers import AutoTokenizer

        self._tokenizer: Any = AutoTokenizer.from_pretrained(str(model_path))

    def count(self, request: EngineRequest) -> int:
        return len(encode_prompt(self._tokenizer, request))


def encode_prompt(tokenizer: Any, request: EngineRequest) -> list[int]:
    """Token ids of a request's prompt: the chat template applied, or the raw prompt."""
    if request.messages is not None:
        text = tokenizer.apply_chat_template(
            [m.model_dump() for m in request.messages],
            tokenize=False,
            add_generation_prompt=True,
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(request.prompt or "")["input_ids"])
