"""How many tokens a prompt costs on a model, counted with its own tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks.contract import EngineRequest


class PromptMeter:
    """Counts prompt tokens as the engine will, so over-long prompts are refused up front."""

    def __init__(self, model_path: Path) -> None:
        from transformers import AutoTokenizer

        self._tokenizer: Any = AutoTokenizer.from_pretrained(str(model_path))

    def count(self, request: EngineRequest) -> int:
        return len(encode_prompts(self._tokenizer, [request])[0])

    def count_many(self, requests: Sequence[EngineRequest]) -> list[int]:
        return [len(ids) for ids in encode_prompts(self._tokenizer, requests)]


def encode_prompts(tokenizer: Any, requests: Sequence[EngineRequest]) -> list[list[int]]:
    """Token ids of each request's prompt (the chat template applied, or the raw prompt),
    in one tokenizer call per kind: batching matters for bulk jobs."""
    ids: list[list[int]] = [[] for _ in requests]
    chats = [i for i, r in enumerate(requests) if r.messages is not None]
    raws = [i for i, r in enumerate(requests) if r.messages is None]
    if chats:
        texts = [
            tokenizer.apply_chat_template(
                [m.model_dump() for m in requests[i].messages or []],
                tokenize=False,
                add_generation_prompt=True,
            )
            for i in chats
        ]
        for i, encoded in zip(
            chats, tokenizer(texts, add_special_tokens=False)["input_ids"], strict=True
        ):
            ids[i] = list(encoded)
    if raws:
        texts = [requests[i].prompt or "" for i in raws]
        for i, encoded in zip(raws, tokenizer(texts)["input_ids"], strict=True):
            ids[i] = list(encoded)
    return ids
