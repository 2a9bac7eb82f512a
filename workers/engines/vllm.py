"""vLLM adapter, in-process: the same code for the GPU build (`vllm`) and the CPU build.

In-process mode (no engine subprocess) is what works inside a Celery worker and is the faster
choice on small CPU machines; on a GPU it costs little since the model dominates.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inferq.models import encode_prompts
from router.config import ModelSpec
from tasks.contract import EngineRequest
from workers.engines.base import Generation

_ENV_DEFAULTS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the CPU build otherwise reserves most of a NUMA node
    "HF_HUB_OFFLINE": "1",
    "VLLM_CONFIGURE_LOGGING": "0",
}


class VllmEngine:
    name = "vllm"

    def __init__(self, spec: ModelSpec, *, model_path: Path, seed: int = 0) -> None:
        for key, value in _ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from vllm import LLM

        kwargs: dict[str, Any] = {
            "model": str(model_path),
            "max_model_len": spec.max_model_len,
            "max_num_seqs": spec.max_batch_size,
            "enforce_eager": True,
            "seed": seed,
            "distributed_executor_backend": "uni",
            "disable_log_stats": False,  # per-request timestamps for time to first token
            # guidance keeps JSON strings free of raw control characters (xgrammar did not)
            "structured_outputs_config": {"backend": "guidance", "disable_any_whitespace": True},
        }
        if spec.quantization != "none":  # checked against the weights when the config loaded
            kwargs["quantization"] = spec.quantization
        kwargs.update(spec.options)
        self._llm = LLM(**kwargs)
        self._tokenizer = self._llm.get_tokenizer()

    def generate(self, requests: Sequence[EngineRequest]) -> list[Generation]:
        prompts = [{"prompt_token_ids": ids} for ids in encode_prompts(self._tokenizer, requests)]
        params = [self._sampling(r) for r in requests]
        started_wall = time.time()
        outputs = self._llm.generate(prompts, params, use_tqdm=False)
        return [self._generation(out, started_wall) for out in outputs]

    def close(self) -> None:
        engine_core = getattr(self._llm.llm_engine, "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()

    @staticmethod
    def _sampling(request: EngineRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        constraint = None
        if request.json_schema is not None:
            constraint = StructuredOutputsParams(json=request.json_schema)
        elif request.choices is not None:
            constraint = StructuredOutputsParams(choice=request.choices)
        return SamplingParams(
            n=request.n,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=request.stop,
            ignore_eos=request.ignore_eos,
            structured_outputs=constraint,
        )

    @staticmethod
    def _generation(out: Any, started_wall: float) -> Generation:
        ttft = None
        metrics = out.metrics
        if metrics is not None and metrics.first_token_latency:
            ttft = max(metrics.arrival_time - started_wall, 0.0) + metrics.first_token_latency
        return Generation(
            texts=[c.text for c in out.outputs],
            prompt_tokens=len(out.prompt_token_ids or ()),
            completion_tokens=sum(len(c.token_ids) for c in out.outputs),
            finish_reason=out.outputs[0].finish_reason,
            ttft_s=ttft,
        )
