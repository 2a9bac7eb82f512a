"""What the benchmarks send: seeded chat requests whose output length is known in advance.

Every item runs with ``ignore_eos`` and its own ``max_tokens``, so a request that succeeded
produced exactly ``max_tokens`` completion tokens; anything else is not counted.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from core.enums import TaskKind
from tasks.contract import EngineRequest
from tasks.templates import SamplingIn, render
from weights.tokens import PromptMeter

# About 80 prompt tokens with the chat template on the tiny model's tokenizer (81 today).
PROMPT = (
    "Write a short product title for this item: a lightweight waterproof hiking jacket in "
    "forest green with taped seams, two zipped hand pockets, an adjustable hood and a "
    "recycled polyester shell, size medium."
)
WORDS = (
    "jacket boots tent lamp kettle backpack stove blanket bottle glove scarf hood zip seam pocket "
    "strap buckle sole lining shell fleece wool cotton nylon steel bamboo leather canvas green "
    "navy grey black red amber light heavy warm dry compact folding waterproof recycled padded "
    "adjustable small medium large size weight colour price stock order return review describe "
    "list compare summarise the a for with and of in on to by from"
).split()


@dataclass(frozen=True, slots=True)
class Item:
    """One chat request: a user message and the exact number of tokens it must generate."""

    text: str
    max_tokens: int

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.text}]

    @property
    def params(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "ignore_eos": True, "temperature": 0}

    def body(self, priority: str) -> dict[str, Any]:
        """The ``POST /v1/requests`` body."""
        return {
            "task": "chat",
            "input": {"messages": self.messages},
            "params": self.params,
            "priority": priority,
        }

    def engine_request(self) -> EngineRequest:
        """What the API would hand the engine for this item."""
        return render(TaskKind.CHAT, {"messages": self.messages}, SamplingIn(**self.params))


def fixed(count: int, max_tokens: int) -> list[Item]:
    """One prompt (about 58 tokens), ``max_tokens`` each: the peer baselines' workload."""
    return [Item(PROMPT, max_tokens)] * count


def workload(
    seed: int, count: int, *, prompt_words: tuple[int, int], output_tokens: tuple[int, int]
) -> list[Item]:
    """Distinct prompts and output lengths, each drawn log-uniformly from its range.

    Log-uniform keeps short and long requests both common: with outputs from 4 to 256 about
    a third ask for under 16 tokens and a third for over 64.
    """
    rng = random.Random(seed)
    items = []
    for number in range(count):
        words = rng.choices(WORDS, k=_log_uniform(rng, *prompt_words))
        items.append(Item(f"{number}: {' '.join(words)}", _log_uniform(rng, *output_tokens)))
    return items


def fit(items: Sequence[Item], meter: PromptMeter, max_model_len: int) -> list[Item]:
    """Cap each item's ``max_tokens`` so its prompt and output fit the model's context."""
    lengths = meter.count_many([item.engine_request() for item in items])
    return [
        replace(item, max_tokens=max(1, min(item.max_tokens, max_model_len - length)))
        for item, length in zip(items, lengths, strict=True)
    ]


def jsonl(items: Sequence[Item]) -> bytes:
    """A bulk job's upload: one line per item (the job shares its parameters)."""
    return b"\n".join(
        json.dumps({"id": f"item-{i}", "input": {"messages": item.messages}}).encode()
        for i, item in enumerate(items)
    )


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    if low >= high:
        return low
    return min(high, max(low, round(math.exp(rng.uniform(math.log(low), math.log(high))))))
