"""Service mode against the bare engine, side by side in one run.

Each round sends N chat requests through API → Redis → one worker → Postgres, timed from the
first submit to the last result stored (the max ``finished_at``), and runs the same prompts
with the same parameters straight through vLLM in one ``LLM.generate`` call at the same
``max_num_seqs``. Only requests that succeeded with exactly their ``max_tokens`` completion
tokens count (EOS is ignored, so any other count is a fault). Modes:

- ``fixed``: one prompt (about 80 tokens), exactly ``--max-tokens`` each: the peer baselines.
- ``mixed``: distinct prompts of varied length and outputs drawn log-uniformly from
  ``--mixed-output`` (default 4 to 256 tokens, capped by the model's context), seeded, new
  prompts each round.

Each round runs every mode, the side that goes first swapping every round; ratios are taken
within a round and the figures are medians over rounds. The last line printed is one JSON
object: the fixed mode's figures under the original keys, and each mode's under its prefix
(``fixed_ratio``, ``mixed_ratio``, ``mixed_service_rps``, ...).

    python -m bench.throughput [--mode fixed|mixed|both] [--requests 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from typing import Any

from bench import workload
from bench.direct import DirectEngine, direct_engine
from bench.rounds import Figures, medians, paired, show
from bench.stack import Stack, outcome, service, submit_all, wait_finished
from storage.ledger_stats import percentile
from storage.tables import Request
from weights.paths import resolve_model_path
from weights.tokens import PromptMeter

MODES = ("fixed", "mixed")


def main() -> None:
    args = _parse()
    modes = MODES if args.mode == "both" else (args.mode,)
    rounds: dict[str, list[Figures]] = {mode: [] for mode in modes}
    with service() as stack, direct_engine(stack.spec, stack.settings) as engine:
        meter = PromptMeter(resolve_model_path(stack.spec.path, stack.settings))
        for number in range(1, args.rounds + 1):
            for mode in modes:
                items = _items(mode, args, args.seed + number - 1, stack, meter)
                figures, first = paired(
                    number,
                    partial(_service_round, stack, items, args.concurrency),
                    partial(_direct_round, engine, items),
                )
                figures["ratio"] = figures["service_rps"] / figures["direct_rps"]
                rounds[mode].append(figures)
                print(show(f"round {number} {mode} ({first} first)", figures))
        spec = stack.spec
    result: dict[str, Any] = {
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "max_batch_size": spec.max_batch_size,
        "max_num_seqs": spec.max_batch_size,
        "rounds": args.rounds,
        "mode": args.mode,
        "seed": args.seed,
        "mixed_output": args.mixed_output,
        "mixed_prompt_words": args.mixed_prompt_words,
    }
    for mode in modes:
        figures = medians(rounds[mode])
        result.update({f"{mode}_{name}": value for name, value in figures.items()})
        print(
            f"{mode}: service {figures['service_rps']} requests/s "
            f"({figures['service_tokens_per_s']} tokens/s, p50 {figures['p50_latency_s']}s, "
            f"p95 {figures['p95_latency_s']}s, mean batch {figures['mean_batch_size']}); "
            f"direct {figures['direct_rps']} requests/s; "
            f"ratio (median of {args.rounds} rounds) {figures['ratio']}"
        )
    result.update(medians(rounds[modes[0]]))  # the original keys: fixed where it ran
    print(json.dumps(result))


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mode", choices=(*MODES, "both"), default="both")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=32, help="Fixed mode's output.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32, help="Client connections.")
    parser.add_argument("--seed", type=int, default=0, help="Mixed mode's first round.")
    parser.add_argument("--mixed-output", type=_span, default=(4, 256), metavar="LO:HI")
    parser.add_argument("--mixed-prompt-words", type=_span, default=(4, 160), metavar="LO:HI")
    return parser.parse_args()


def _span(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    return int(low), int(high or low)


def _items(
    mode: str, args: argparse.Namespace, seed: int, stack: Stack, meter: PromptMeter
) -> list[workload.Item]:
    """A round's requests: the mixed mode draws new prompts each round (``seed`` + round - 1),
    so no round finds the previous one's prompts in the engines' prefix caches."""
    if mode == "fixed":
        return workload.fixed(args.requests, args.max_tokens)
    items = workload.workload(
        seed, args.requests, prompt_words=args.mixed_prompt_words, output_tokens=args.mixed_output
    )
    return workload.fit(items, meter, stack.spec.max_model_len)


def _service_round(stack: Stack, items: list[workload.Item], concurrency: int) -> Figures:
    started = time.time()
    ids = submit_all(stack, [item.body("batch") for item in items], concurrency)
    submit_s = time.time() - started
    seen = wait_finished(stack, Request.id.in_(ids), len(ids))
    expected = {i: item.max_tokens for i, item in zip(ids, items, strict=True)}
    result = outcome(stack, Request.id.in_(ids), expected.__getitem__)
    elapsed = result.last_finished - started
    return {
        "service_rps": result.ok / elapsed,
        "service_tokens_per_s": result.completion_tokens / elapsed,
        "service_ok": result.ok,
        "p50_latency_s": percentile(result.latencies, 50),
        "p95_latency_s": percentile(result.latencies, 95),
        "mean_batch_size": result.mean_batch_size,
        "submit_s": submit_s,
        # When the poll saw every result stored, after the last finished_at (poll every 50 ms).
        "seen_after_last_s": seen - result.last_finished,
    }


def _direct_round(engine: DirectEngine, items: list[workload.Item]) -> Figures:
    run = engine.run(items)
    return {
        "direct_rps": run.rps,
        "direct_tokens_per_s": run.tokens_per_s,
        "direct_ok": run.ok,
    }


if __name__ == "__main__":
    main()
