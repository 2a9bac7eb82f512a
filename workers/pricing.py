"""What one attempt costs: self-hosted models by GPU time, hosted APIs by tokens.

A self-hosted model is paid for by the hour whether busy or not, so an attempt is charged its
share of the batch's GPU-seconds. A hosted API bills tokens and uses none of our GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.config import HOSTED_ENGINES, ModelSpec


@dataclass(frozen=True, slots=True)
class Price:
    gpu_seconds: float
    cost: float


def price_attempt(
    spec: ModelSpec, *, gpu_seconds: float, prompt_tokens: int, completion_tokens: int
) -> Price:
    """Price an attempt given the GPU-seconds attributed to it and its token counts."""
    if spec.engine in HOSTED_ENGINES:
        cost = (
            prompt_tokens * spec.price_per_million_input_tokens
            + completion_tokens * spec.price_per_million_output_tokens
        ) / 1_000_000
        return Price(gpu_seconds=0.0, cost=cost)
    return Price(gpu_seconds=gpu_seconds, cost=gpu_seconds * spec.price_per_gpu_hour / 3600)
