"""Bulk jobs: time to accept a large file, time to its first result, and bulk throughput
against the same prompts straight through the engine.

    python -m bench.bulk [--lines 100000] [--throughput-lines 2000] [--rounds 3]

Throughput: each round uploads a job of ``--throughput-lines`` chat lines (about 80 prompt
tokens, exactly 32 generated, EOS ignored; 2,000 lines are checked inline) and times it from
the upload to the last result stored (the max ``finished_at``), counting only lines that
succeeded with 32 completion tokens; the same prompts also run straight through vLLM in one
``LLM.generate`` call at the same ``max_num_seqs`` (bench/direct.py). The side that goes first
swaps every round; ratios are taken within a round and the figures are medians over rounds.

Acceptance, once after the rounds: accepting means the upload's HTTP call returned 202. A file
over ``inline_job_lines`` (2,000) is stored whole and answered ``validating``; its lines are
then checked, committed and published in the background, a small first chunk first
(api/admission.py), so the first result follows within about a second. That job is cancelled
once its first result is in. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import httpx

from bench import workload
from bench.direct import direct_engine
from bench.rounds import Figures, medians, paired, show
from bench.stack import Stack, outcome, service, upload_job, wait_finished, wait_job
from storage.tables import Request

MAX_TOKENS = 32
FIRST_RESULT_TIMEOUT_S = 600


def main() -> None:
    args = _parse()
    items = workload.fixed(args.throughput_lines, MAX_TOKENS)
    rounds: list[Figures] = []
    with (
        service() as stack,
        direct_engine(stack.spec, stack.settings) as engine,
        httpx.Client(base_url=stack.url, headers=stack.headers, timeout=3600) as client,
    ):
        # Throughput first: the big job's cancelled remainder would sit ahead of it.
        for number in range(1, args.rounds + 1):
            figures, first = paired(
                number,
                lambda: _throughput(client, stack, items),
                lambda: {"direct_rps": engine.run(items).rps},
            )
            figures["ratio"] = figures["bulk_rps"] / figures["direct_rps"]
            rounds.append(figures)
            print(show(f"round {number} ({first} first)", figures))
        accept_s, first_s = _accept_and_first(client, args.lines)
        max_num_seqs = stack.spec.max_batch_size
    throughput = medians(rounds)
    figures = {
        "lines": args.lines,
        "accept_s": round(accept_s, 2),
        "accept_lines_per_s": round(args.lines / accept_s, 1),
        "first_result_after_accept_s": round(first_s, 3),
        "throughput_lines": args.throughput_lines,
        "max_num_seqs": max_num_seqs,
        "rounds": args.rounds,
        **throughput,
    }
    print(f"accepted {args.lines} lines in {accept_s:.1f}s; first result {first_s:.2f}s later")
    print(
        f"bulk {throughput['bulk_rps']} requests/s vs direct {throughput['direct_rps']}: "
        f"ratio (median of {args.rounds} rounds) {throughput['ratio']}"
    )
    print(json.dumps(figures))


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--throughput-lines", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args()


def _throughput(client: httpx.Client, stack: Stack, items: list[workload.Item]) -> Figures:
    started = time.time()
    job_id, _accept_s = upload_job(client, items)
    in_job = Request.job_id == job_id
    wait_finished(stack, in_job, len(items))
    result = outcome(stack, in_job, lambda _id: MAX_TOKENS)
    return {"bulk_rps": result.ok / (result.last_finished - started), "bulk_ok": result.ok}


def _accept_and_first(client: httpx.Client, n: int) -> tuple[float, float]:
    job_id, accept_s = upload_job(client, workload.fixed(n, MAX_TOKENS))
    accepted = time.perf_counter()
    while client.get(f"/v1/jobs/{job_id}").json()["counts"]["succeeded"] == 0:
        if time.perf_counter() - accepted > FIRST_RESULT_TIMEOUT_S:
            raise SystemExit("bench: no result within 10 minutes of acceptance")
        time.sleep(0.01)
    first_s = time.perf_counter() - accepted
    client.post(f"/v1/jobs/{job_id}/cancel").raise_for_status()
    wait_job(client, job_id)
    return accept_s, first_s


if __name__ == "__main__":
    main()
