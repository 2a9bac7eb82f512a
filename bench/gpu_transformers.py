"""The transformers adapter at batch sizes 1/8/32/128 on a Llama-shaped random-weight model.

How much does batching buy on this card? The model is built in memory (about 1 B parameters on
a GPU, a tiny one on CPU) with the tiny model's tokenizer, so nothing is downloaded; every
request has about the same prompt length and generates exactly ``--new-tokens`` (``ignore_eos``).
Nothing here imports vLLM. Needs torch, transformers and the repo's engine (pydantic,
pydantic-settings, pyyaml). Where pydantic is missing (the lent GPU machines), carry
py3.12 wheels and install them first:

    pip install --no-index --find-links .cache/bench-wheels pydantic pydantic-settings
    python -m bench.gpu_transformers [--params 1b|tiny] [--batch-sizes 1 8 32 128]

Prints one line per batch size, then one JSON object. Stops early past ``--budget-s``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

SIZES: dict[str, dict[str, Any]] = {
    # TinyLlama-1.1B's shape; with the small vocabulary about 0.97 B parameters.
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
           "num_attention_heads": 32, "num_key_value_heads": 4},
    "tiny": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 4},
}  # fmt: skip


def main() -> None:
    args = _parser().parse_args()
    began = time.perf_counter()
    import torch

    from workers.engines.transformers import TransformersEngine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    size = args.params or ("1b" if device == "cuda" else "tiny")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    prompt_tokens = args.prompt_tokens or (128 if device == "cuda" else 32)
    new_tokens = args.new_tokens or (64 if device == "cuda" else 16)
    tokenizer = _tokenizer()
    model = _model(size, len(tokenizer), device=device, dtype=dtype)
    engine = TransformersEngine(model, tokenizer)
    prompts = _prompts(tokenizer, prompt_tokens, max(args.batch_sizes))
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()})"
    params = sum(p.numel() for p in model.parameters())
    print(f"device {name}; {params / 1e9:.2f} B parameters, {dtype}; setup {_since(began):.1f}s")
    rows = []
    for batch in args.batch_sizes:
        if _since(began) > args.budget_s:
            print(f"batch {batch}: skipped, past the {args.budget_s:.0f}s budget")
            continue
        rows.append(_measure(engine, prompts[:batch], new_tokens, repeats=args.repeats))
        row = rows[-1]
        print(
            f"batch {batch:4d}: {row['requests_per_s']:8.2f} requests/s "
            f"{row['tokens_per_s']:10.0f} tokens/s  ttft {row['ttft_s'] * 1000:7.1f} ms"
        )
    engine.close()
    print(json.dumps({"device": name, "params": params, "dtype": str(dtype), "rows": rows}))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", choices=sorted(SIZES), help="default: 1b on cuda, else tiny")
    parser.add_argument("--device", help="default: cuda when present, else cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--prompt-tokens", type=int, help="default: 128 on cuda, else 32")
    parser.add_argument("--new-tokens", type=int, help="default: 64 on cuda, else 16")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per batch size")
    parser.add_argument("--budget-s", type=float, default=150.0)
    return parser


def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    from weights.tiny import ensure_tiny_model

    with tempfile.TemporaryDirectory() as folder:
        return AutoTokenizer.from_pretrained(str(ensure_tiny_model(Path(folder))))


def _model(size: str, vocab: int, *, device: str, dtype: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=1024, **SIZES[size])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    return model.to(dtype)


def _prompts(tokenizer: Any, length: int, count: int) -> list[Any]:
    """Raw prompts of exactly ``length`` tokens (bos included), each different."""
    from tasks.contract import EngineRequest

    words = "red leather boots size waterproof jacket green cotton linen steel".split()
    prompts = []
    for i in range(count):
        text = " ".join(words[(i + k) % len(words)] for k in range(length * 2))
        ids = tokenizer(text)["input_ids"][:length]
        prompts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return [EngineRequest(prompt=p, max_tokens=1, ignore_eos=True) for p in prompts]


def _measure(engine: Any, requests: list[Any], new_tokens: int, *, repeats: int) -> dict[str, Any]:
    batch = [r.model_copy(update={"max_tokens": new_tokens}) for r in requests]
    engine.generate(batch)  # warm-up: kernels, allocator
    clock = time.perf_counter()
    generations = [g for _ in range(repeats) for g in engine.generate(batch)]
    elapsed = time.perf_counter() - clock
    tokens = sum(g.completion_tokens for g in generations)
    ttfts = [g.ttft_s for g in generations if g.ttft_s is not None]
    return {
        "batch": len(batch),
        "requests_per_s": len(generations) / elapsed,
        "tokens_per_s": tokens / elapsed,
        "ttft_s": sum(ttfts) / max(len(ttfts), 1),
        "prompt_tokens": generations[0].prompt_tokens,
        "seconds": elapsed,
    }


def _since(began: float) -> float:
    return time.perf_counter() - began


if __name__ == "__main__":
    main()
