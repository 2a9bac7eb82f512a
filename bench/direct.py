"""The bare engine: vLLM's ``LLM.generate`` over all prompts in one call, the service's limit.

Built here rather than through the worker's adapter, so the baseline stays the engine's own
continuous batching whatever the worker does. Same model, context and ``max_num_seqs`` as the
worker's config.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from bench.workload import Item
from core.settings import Settings
from router.config import ModelSpec
from weights.paths import resolve_model_path
from weights.tokens import encode_prompts

# In-process (no engine subprocess), 1 GiB of KV cache, nothing fetched: see vllm-cpu.md.
ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_CONFIGURE_LOGGING": "0",
}


@dataclass(frozen=True, slots=True)
class Run:
    """One call: how many requests came back with exactly their expected tokens, and when."""

    ok: int
    completion_tokens: int
    seconds: float

    @property
    def rps(self) -> float:
        return self.ok / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds


class DirectEngine:
    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        for key, value in ENV.items():
            os.environ.setdefault(key, value)
        from vllm import LLM

        self._llm: Any = LLM(
            model=str(resolve_model_path(spec.path, settings)),
            max_model_len=spec.max_model_len,
            max_num_seqs=spec.max_batch_size,
            enforce_eager=True,
            seed=0,
            distributed_executor_backend="uni",
            **spec.options,
        )
        self._tokenizer = self._llm.get_tokenizer()

    def run(self, items: Sequence[Item]) -> Run:
        """All items in one ``generate`` call, timed around that call only."""
        from vllm import SamplingParams

        requests = [item.engine_request() for item in items]
        prompts = [{"prompt_token_ids": ids} for ids in encode_prompts(self._tokenizer, requests)]
        params = [
            SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True)
            for r in requests
        ]
        clock = time.perf_counter()
        outputs = self._llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - clock
        counts = [len(out.outputs[0].token_ids) for out in outputs]
        good = [n for n, item in zip(counts, items, strict=True) if n == item.max_tokens]
        return Run(ok=len(good), completion_tokens=sum(good), seconds=seconds)

    def close(self) -> None:
        engine_core = getattr(self._llm.llm_engine, "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()


@contextmanager
def direct_engine(spec: ModelSpec, settings: Settings) -> Iterator[DirectEngine]:
    engine = DirectEngine(spec, settings)
    try:
        engine.run([Item("warm up", 8)] * 8)  # warm, as the worker is
        yield engine
    finally:
        engine.close()
