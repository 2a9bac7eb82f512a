"""Plain ``transformers`` adapter: batched ``generate`` with left padding, on CPU or CUDA.

For machines and models vLLM does not serve. Requests sharing sampling settings run as one
left-padded ``generate`` call, so greedy output matches each prompt run alone. ``choices``
are scored (the log-likelihood of each full answer, end-of-sequence included) rather than
generated. ``json_schema`` is NOT enforced here: the text is generated freely and the worker
still validates it (``tasks.templates.parse_output``), so a non-JSON answer is a failed
attempt, never silent garbage.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from router.config import ModelSpec
from tasks.contract import EngineRequest
from weights.tokens import encode_prompts
from workers.engines.base import Generation

OPTIONS = frozenset({"device", "dtype", "attn_implementation"})
SCORE_ROWS = 64  # prompt+choice rows per forward when scoring choices


class TransformersEngine:
    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any, *, seed: int = 0) -> None:
        """Wrap a loaded model and tokenizer (``load`` reads them from a folder)."""
        import torch

        self._torch = torch
        self._model = model.eval()
        self._tokenizer = tokenizer
        self._tokenizer.padding_side = "left"
        if self._tokenizer.pad_token_id is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self._eos = self._tokenizer.eos_token_id
        torch.manual_seed(seed)  # once per worker: unseeded requests then differ call to call

    @classmethod
    def load(cls, spec: ModelSpec, *, model_path: Path, seed: int = 0) -> TransformersEngine:
        """Load from a model folder; options ``device`` (default cuda when present), ``dtype``."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        options = dict(spec.options)
        unknown = set(options) - OPTIONS
        if unknown:
            raise ValueError(f"transformers engine: unknown options {sorted(unknown)}")
        device = options.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = options.pop("dtype", "auto")
        model: Any = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype, **options)
        return cls(model.to(device), AutoTokenizer.from_pretrained(str(model_path)), seed=seed)

    @property
    def device(self) -> Any:
        return self._model.device

    def generate(self, requests: Sequence[EngineRequest]) -> list[Generation]:
        started = time.perf_counter()
        prompts = encode_prompts(self._tokenizer, requests)
        results: list[Generation | None] = [None] * len(requests)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(_group_key(request), []).append(i)
        with self._torch.inference_mode():
            for indices in groups.values():
                first = requests[indices[0]]
                ids = [prompts[i] for i in indices]
                if first.choices is not None:
                    made = self._choose(ids, [requests[i] for i in indices], started)
                else:
                    made = self._sample(ids, first, started)
                for i, generation in zip(indices, made, strict=True):
                    results[i] = generation
        return [g for g in results if g is not None]

    def close(self) -> None:
        self._model = None
        if self._torch.cuda.is_available():
            self._torch.cuda.empty_cache()

    def _padded(self, ids: Sequence[Sequence[int]]) -> tuple[Any, Any]:
        batch = self._tokenizer.pad({"input_ids": [list(x) for x in ids]}, return_tensors="pt")
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def _sample(
        self, prompts: list[list[int]], request: EngineRequest, started: float
    ) -> list[Generation]:
        """One ``generate`` call for requests that share every sampling setting."""
        greedy = request.temperature == 0
        copies = 1 if greedy else request.n
        input_ids, mask = self._padded([p for p in prompts for _ in range(copies)])
        clock = _FirstToken(self._torch)
        kwargs: dict[str, Any] = {
            "max_new_tokens": request.max_tokens,
            "do_sample": not greedy,
            "pad_token_id": self._tokenizer.pad_token_id,
            "eos_token_id": None if request.ignore_eos else self._eos,
            "logits_processor": [clock],
        }
        if not greedy:
            kwargs.update(temperature=request.temperature, top_p=request.top_p, top_k=0)
            if request.seed is not None:
                self._torch.manual_seed(request.seed)
        if request.stop:
            kwargs.update(stop_strings=request.stop, tokenizer=self._tokenizer)
        out = self._model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        new = out[:, input_ids.shape[1] :].tolist()
        ttft = (clock.at or time.perf_counter()) - started
        made = []
        for k, prompt in enumerate(prompts):
            rows = new[k * copies : (k + 1) * copies] * (request.n if greedy else 1)
            texts, counts, reasons = zip(*(self._finish(r, request) for r in rows), strict=True)
            made.append(Generation(list(texts), len(prompt), sum(counts), reasons[0], ttft))
        return made

    def _finish(self, row: list[int], request: EngineRequest) -> tuple[str, int, str]:
        """Cut a generated row at end-of-sequence or a stop string, as vLLM reports it."""
        reason = "length"
        if not request.ignore_eos and self._eos in row:
            row, reason = row[: row.index(self._eos) + 1], "stop"
        text = self._decode(row)
        hits = [text.index(s) for s in request.stop or () if s in text]
        if hits:
            text, reason = text[: min(hits)], "stop"
            row = row[: self._tokens_until_stop(row, request.stop or [])]
        return text, len(row), reason

    def _tokens_until_stop(self, row: list[int], stop: list[str]) -> int:
        """Fewest leading tokens whose text holds a stop string (binary search; monotone)."""
        low, high = 1, len(row)
        while low < high:
            middle = (low + high) // 2
            if any(s in self._decode(row[:middle]) for s in stop):
                high = middle
            else:
                low = middle + 1
        return low

    def _decode(self, row: list[int]) -> str:
        return str(self._tokenizer.decode(row, skip_special_tokens=True))

    def _choose(
        self, prompts: list[list[int]], requests: list[EngineRequest], started: float
    ) -> list[Generation]:
        """Pick each request's choice by the log-likelihood of answering exactly it."""
        encoded = [self._choice_ids(r.choices or []) for r in requests]
        scores = self._score(
            [p + c for p, options in zip(prompts, encoded, strict=True) for c in options],
            [len(c) for options in encoded for c in options],
        )
        ttft = time.perf_counter() - started
        made, offset = [], 0
        for prompt, request, options in zip(prompts, requests, encoded, strict=True):
            mine = scores[offset : offset + len(options)]
            offset += len(options)
            picks = self._pick(mine, request)
            texts = [(request.choices or [])[p] for p in picks]
            completion = sum(len(options[p]) for p in picks)
            made.append(Generation(texts, len(prompt), completion, "stop", ttft))
        return made

    def _choice_ids(self, choices: Sequence[str]) -> list[list[int]]:
        encoded = self._tokenizer(list(choices), add_special_tokens=False)["input_ids"]
        return [[*ids, self._eos] for ids in encoded]

    def _score(self, rows: list[list[int]], tail_lens: list[int]) -> Any:
        """Sum of log-probabilities of each row's last ``tail_len`` tokens, in chunks that
        bound the logits' memory (rows x length x vocabulary)."""
        chunks = [
            self._score_chunk(rows[i : i + SCORE_ROWS], tail_lens[i : i + SCORE_ROWS])
            for i in range(0, len(rows), SCORE_ROWS)
        ]
        return self._torch.cat(chunks)

    def _score_chunk(self, rows: list[list[int]], tail_lens: list[int]) -> Any:
        input_ids, mask = self._padded(rows)
        logits = self._model(input_ids=input_ids, attention_mask=mask).logits.float()
        logprobs = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0]
        positions = self._torch.arange(logprobs.shape[1], device=logprobs.device)
        tails = self._torch.tensor(tail_lens, device=logprobs.device)[:, None]
        keep = positions >= logprobs.shape[1] - tails
        return (logprobs * keep).sum(-1).cpu()

    def _pick(self, scores: Any, request: EngineRequest) -> list[int]:
        if request.temperature == 0:
            return [int(scores.argmax())] * request.n
        generator = None
        if request.seed is not None:
            generator = self._torch.Generator().manual_seed(request.seed)
        probs = (scores / request.temperature).softmax(-1)
        picks = probs.multinomial(request.n, replacement=True, generator=generator)
        return [int(p) for p in picks]


class _FirstToken:
    """A no-op logits processor that notes when the first token is chosen (after prefill)."""

    def __init__(self, torch: Any) -> None:
        self._torch = torch
        self.at: float | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.at is None:
            if scores.is_cuda:
                self._torch.cuda.synchronize(scores.device)
            self.at = time.perf_counter()
        return scores


def _group_key(request: EngineRequest) -> tuple[Any, ...]:
    """Requests that can share one ``generate`` call; choice requests all score together."""
    if request.choices is not None:
        return ("choices",)
    stop = tuple(request.stop or ())
    return (
        request.max_tokens,
        request.temperature,
        request.top_p,
        request.n,
        request.seed,
        stop,
        request.ignore_eos,
    )
