"""How many tokens a prompt costs on a model, counted with its own tokenizer."""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

from tasks.contract import EngineRequest

# Distinct prompts whose counts are kept. Bulk jobs repeat templates (and often whole
# prompts); rendering the chat template and tokenizing a prompt costs far more than a lookup.
_CACHED_PROMPTS = 8192


class PromptMeter:
    """Counts prompt tokens as the engine will, so over-long prompts are refused up front.

    Counts are kept per distinct prompt (the messages, or the raw prompt): a count depends
    on nothing else, and admitting a bulk job otherwise tokenizes the same text once a line.
    """

    def __init__(self, model_path: Path) -> None:
        from transformers import AutoTokenizer

        self._tokenizer: Any = AutoTokenizer.from_pretrained(str(model_path))
        self._counts: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def count(self, request: EngineRequest) -> int:
        return self.count_many([request])[0]

    def count_many(self, requests: Sequence[EngineRequest]) -> list[int]:
        keys = [prompt_key(r) for r in requests]
        with self._lock:
            known = [self._counts.get(key) for key in keys]
        missing: dict[Hashable, EngineRequest] = {}
        for key, request, count in zip(keys, requests, known, strict=True):
            if count is None:
                missing.setdefault(key, request)
        if missing:
            counted = dict(
                zip(
                    missing,
                    (len(ids) for ids in encode_prompts(self._tokenizer, list(missing.values()))),
                    strict=True,
                )
            )
            with self._lock:
                if len(self._counts) + len(counted) > _CACHED_PROMPTS:
                    self._counts.clear()  # simpler than LRU; a refill costs one chunk's count
                self._counts.update(counted)
            known = [counted[k] if c is None else c for k, c in zip(keys, known, strict=True)]
        return [c for c in known if c is not None]


def prompt_key(request: EngineRequest) -> Hashable:
    """What a prompt's token count depends on: the chat's messages, or the raw prompt."""
    if request.messages is not None:
        return tuple((m.role, m.content) for m in request.messages)
    return request.prompt or ""


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
