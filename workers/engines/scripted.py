"""A scripted engine for exact assertions and injected faults: no model, same protocol.

Rules match a substring of a request's last message (or prompt) and make the batch holding it
slow, fail or hang, or give that request a fixed ``answer`` (an output to test what reads it).
Output is otherwise deterministic: a minimal object valid for a JSON schema, the first label
of a choice, an echo of the input, or for an ``embed`` request ``scripted_vector`` of it.

A ``step_curve`` (batch size → seconds a call takes, as measured on a GPU) makes each call
sleep as long as that GPU would take for its batch: a simulated GPU-bound engine, which like
a real one releases the GIL while it works (bench/pipeline.py ``--simulate-gpu``).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tasks.contract import EngineRequest
from workers.engines.base import EngineError, Generation


@dataclass(frozen=True, slots=True)
class Rule:
    match: str
    fail: str | None = None
    delay_s: float = 0.0
    hang: bool = False
    times: int | None = None  # applies to its first N matches only (a transient fault)
    answer: str | None = None  # the matching request's output text, as the engine gives it


@dataclass
class ScriptedEngine:
    name = "scripted"

    rules: Sequence[Rule] = ()
    delay_s: float = 0.0
    step_curve: Sequence[tuple[int, float]] = ()  # (batch size, seconds), ascending
    calls: list[int] = field(default_factory=list)  # batch sizes, for assertions
    matched: dict[int, int] = field(default_factory=dict)  # matches so far, by rule
    _released: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ScriptedEngine:
        rules = [Rule(**rule) for rule in options.get("rules", [])]
        curve = sorted((int(b), float(s)) for b, s in options.get("step_curve", []))
        return cls(rules=rules, delay_s=float(options.get("delay_ms", 0)) / 1000, step_curve=curve)

    def generate(self, requests: Sequence[EngineRequest]) -> list[Generation]:
        self.calls.append(len(requests))
        delay = max(self.delay_s, curve_seconds(self.step_curve, len(requests)))
        for request in requests:
            text = last_text(request)
            for index, rule in enumerate(self.rules):
                if rule.match not in text or not self._applies(index, rule):
                    continue
                if rule.hang:
                    self._released.wait()
                if rule.fail is not None:
                    raise EngineError(rule.fail)
                delay = max(delay, rule.delay_s)
        if delay:
            time.sleep(delay)
        return [scripted_answer(r, self.rules) for r in requests]

    def _applies(self, index: int, rule: Rule) -> bool:
        if rule.times is None:
            return True
        self.matched[index] = self.matched.get(index, 0) + 1
        return self.matched[index] <= rule.times

    def close(self) -> None:
        self._released.set()


def curve_seconds(curve: Sequence[tuple[int, float]], batch: int) -> float:
    """Seconds a call of ``batch`` requests takes on ``curve``: linear between its points,
    flat below the first, and linear in the batch size past the last (more calls)."""
    if not curve:
        return 0.0
    if batch <= curve[0][0]:
        return curve[0][1]
    for (b0, s0), (b1, s1) in itertools.pairwise(curve):
        if batch <= b1:
            return s0 + (s1 - s0) * (batch - b0) / (b1 - b0)
    last_batch, last_s = curve[-1]
    return last_s * batch / last_batch


def last_text(request: EngineRequest) -> str:
    if request.messages:
        return request.messages[-1].content
    return request.prompt or ""


def scripted_vector(text: str, dimensions: int = 8) -> list[float]:
    """A unit vector made from the text's SHA-256: the same text, the same vector."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [(byte - 127.5) / 127.5 for byte in digest[:dimensions]]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def scripted_answer(request: EngineRequest, rules: Sequence[Rule] = ()) -> Generation:
    prompt_words = len(last_text(request).split()) + 1
    if request.embed:
        return Generation([], prompt_words, 0, "stop", 0.0, scripted_vector(last_text(request)))
    fixed = [r.answer for r in rules if r.answer is not None and r.match in last_text(request)]
    if fixed:
        texts = [fixed[0]] * request.n
    elif request.json_schema is not None:
        import json

        texts = [json.dumps(_minimal(request.json_schema))]
    elif request.choices:
        texts = [request.choices[0]]
    else:
        words = ["echo", *last_text(request).split()]
        count = request.max_tokens if request.ignore_eos else min(len(words), request.max_tokens)
        texts = [" ".join((words * (count // len(words) + 1))[:count])] * request.n
    completion = sum(len(t.split()) for t in texts)
    return Generation(
        texts, prompt_words, completion, "length" if request.ignore_eos else "stop", 0.0
    )


def _minimal(schema: Mapping[str, Any]) -> Any:
    kind = schema.get("type")
    if "enum" in schema:
        return schema["enum"][0]
    if kind == "object":
        props = schema.get("properties", {})
        return {name: _minimal(props[name]) for name in schema.get("required", props)}
    if kind == "array":
        return []
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return "x" * max(int(schema.get("minLength", 1)), 1)
