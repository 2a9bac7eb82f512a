"""Engine adapters, chosen by the model config's ``engine`` key."""

from __future__ import annotations

from pathlib import Path

from router.config import ModelSpec
from workers.engines.base import (
    Admission,
    BatchEngine,
    Engine,
    EngineError,
    Generation,
    StepEngine,
    StepOutput,
    generate_all,
)

__all__ = [
    "Admission",
    "BatchEngine",
    "Engine",
    "EngineError",
    "Generation",
    "StepEngine",
    "StepOutput",
    "create_engine",
    "generate_all",
]


def create_engine(spec: ModelSpec, *, model_path: Path, seed: int = 0) -> Engine:
    """Build the adapter a model spec names. Heavy imports happen here, not at import."""
    if spec.engine == "vllm":
        from workers.engines.vllm import VllmEngine

        return VllmEngine(spec, model_path=model_path, seed=seed)
    if spec.engine == "scripted" and spec.options.get("continuous"):
        from workers.engines.scripted_steps import ScriptedStepEngine

        return ScriptedStepEngine.from_options(spec.options, slots=spec.max_batch_size)
    if spec.engine == "scripted":
        from workers.engines.scripted import ScriptedEngine

        return ScriptedEngine.from_options(spec.options)
    if spec.engine == "transformers":
        from workers.engines.transformers import TransformersEngine

        return TransformersEngine.load(spec, model_path=model_path, seed=seed)
    if spec.engine == "openai":
        from workers.engines.hosted import HostedEngine

        return HostedEngine.from_spec(spec)
    raise ValueError(f"unknown engine {spec.engine!r}")
