"""A scripted continuous engine: the step protocol with no model, for exact assertions about
the continuous feed (aborts, priorities, failing and hanging steps).

Each request makes one word a step, up to its answer's length (workers.engines.scripted's
answer); a step sleeps ``step_ms``. Rules match a substring of the request's text: ``fail``
makes every step it is in raise (its first ``times`` steps), ``refuse`` makes ``add`` refuse
it, ``explode`` makes ``add`` raise when it reaches it (what came before it in that call is
in the engine), ``hang`` makes the step it is in block until the engine is closed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from workers.engines.base import Admission, EngineError, Generation, StepOutput
from workers.engines.scripted import Rule, last_text, scripted_answer


@dataclass(slots=True)
class _Active:
    admission: Admission
    answer: Generation
    words: list[str]
    done: int = 0


@dataclass
class ScriptedStepEngine:
    name = "scripted"

    slots: int = 8
    step_s: float = 0.0
    rules: Sequence[Rule] = ()
    refuse: Mapping[str, str] = field(default_factory=dict)  # text substring → reason
    explode: Mapping[str, str] = field(default_factory=dict)  # text substring → add raises
    steps: list[list[str]] = field(default_factory=list)  # ids in each step, for assertions
    matched: dict[int, int] = field(default_factory=dict)
    _active: dict[str, _Active] = field(default_factory=dict)
    _released: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, slots: int) -> ScriptedStepEngine:
        return cls(
            slots=slots,
            step_s=float(options.get("step_ms", 0)) / 1000,
            rules=[Rule(**rule) for rule in options.get("rules", [])],
            refuse=dict(options.get("refuse", {})),
            explode=dict(options.get("explode", {})),
        )

    def add(self, admissions: Sequence[Admission]) -> list[str | None]:
        errors: list[str | None] = []
        for admission in admissions:
            text = last_text(admission.request)
            boom = next((r for match, r in self.explode.items() if match in text), None)
            if boom is not None:
                raise EngineError(boom)
            reason = next((r for match, r in self.refuse.items() if match in text), None)
            if reason is not None:
                errors.append(f"ValueError: {reason}")
                continue
            answer = scripted_answer(admission.request, self.rules)
            words = " ".join(answer.texts).split() or [""]
            self._active[admission.request_id] = _Active(admission, answer, words)
            errors.append(None)
        return errors

    def step(self) -> list[StepOutput]:
        running = sorted(self._active.values(), key=lambda a: a.admission.priority)[: self.slots]
        self.steps.append([a.admission.request_id for a in running])
        for active in running:
            self._apply_rules(last_text(active.admission.request))
        if self.step_s:
            time.sleep(self.step_s)
        outputs = []
        for active in running:
            active.done += 1
            delta = [(0, active.words[active.done - 1] + " ")] if active.admission.stream else []
            finished = None
            if active.done >= len(active.words):
                del self._active[active.admission.request_id]
                finished = active.answer
            outputs.append(StepOutput(active.admission.request_id, delta, finished))
        return outputs

    def _apply_rules(self, text: str) -> None:
        for index, rule in enumerate(self.rules):
            if rule.match not in text:
                continue
            self.matched[index] = self.matched.get(index, 0) + 1
            if rule.times is not None and self.matched[index] > rule.times:
                continue
            if rule.hang:
                self._released.wait()
            if rule.fail is not None:
                raise EngineError(rule.fail)

    def abort(self, request_ids: Sequence[str]) -> None:
        for request_id in request_ids:
            self._active.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self._active)

    def close(self) -> None:
        self._released.set()
