"""Measure a model folder's attribute extraction with the real engine and the real prompt.

The worker's path is reused end to end: ``tasks.templates.render`` builds the ``extract``
prompt and JSON-schema constraint, the vLLM adapter runs it in-process, ``parse_output``
turns text into the result, and :func:`quality.scoring.extract_scores` scores it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.enums import TaskKind
from quality.scoring import ExtractScores, extract_scores
from tasks.templates import OutputError, SamplingIn, parse_output, render


@dataclass(frozen=True, slots=True)
class Measurement:
    scores: ExtractScores
    # Seconds to run every prompt (engine start-up excluded).
    seconds: float


def measure_extraction(
    model_path: Path,
    items: Sequence[dict[str, Any]],
    *,
    schema: dict[str, Any],
    batch_size: int = 64,
) -> Measurement:
    """Run every item's ``text`` through the model; score against its ``attributes``.

    An output that does not parse or fails the schema scores as an empty object.
    """
    from router.config import ModelSpec
    from workers.engines import generate_all
    from workers.engines.vllm import VllmEngine

    requests = [
        render(TaskKind.EXTRACT, {"text": item["text"], "schema": schema}, SamplingIn())
        for item in items
    ]
    spec = ModelSpec(
        engine="vllm",
        path=str(model_path),
        max_model_len=512,
        max_batch_size=batch_size,
        options={"dtype": "float32"},
    )
    engine = VllmEngine(spec, model_path=Path(model_path))
    try:
        started = time.perf_counter()
        generations = []
        for start in range(0, len(requests), batch_size):
            generations += generate_all(engine, requests[start : start + batch_size])
        seconds = time.perf_counter() - started
    finally:
        engine.close()
    candidates: list[Any] = []
    for request, generation in zip(requests, generations, strict=True):
        try:
            candidates.append(parse_output(TaskKind.EXTRACT, request, generation.texts))
        except OutputError:
            candidates.append(None)
    scores = extract_scores(candidates, [item["attributes"] for item in items], schema=schema)
    return Measurement(scores=scores, seconds=seconds)


def describe(name: str, measurement: Measurement) -> str:
    """One line for a report: field exact match per field and overall."""
    s = measurement.scores
    fields = " ".join(f"{k}={v:.2f}" for k, v in s.field_exact.items())
    mean = sum(s.per_item) / len(s.per_item) if s.per_item else 0.0
    return (
        f"{name}: field exact {mean:.3f} ({fields}); all fields {s.all_fields_exact:.3f}; "
        f"F1 {s.f1:.3f}; schema-valid {s.schema_valid:.3f}; n={s.n}; {measurement.seconds:.1f}s"
    )
