"""Interactive latency, idle and under a bulk job: time to first token and end to end.

Starts the same stack as bench.throughput (API + one ``tiny`` worker, own database), then
sends short chat requests (priority ``interactive``, exactly ``--tokens`` output tokens, EOS
ignored) one at a time: first on an idle worker, then while a bulk job of ``--bulk`` batch lines
with ``--bulk-tokens`` outputs each keeps it saturated. Only requests that succeeded with
exactly ``--tokens`` completion tokens count.

Time to first token, chosen at run time and printed:

- ``stream``: ``GET /v1/requests/{id}/stream`` (SSE); TTFT is when the first ``token`` event
  arrives, end to end when the ``result`` event does, both from just before the POST;
- ``record``: where that endpoint answers 404, the request record's ``latency.ttft_s`` and
  ``latency.total_s`` (from the commit to the first token and to the result).

Goals: idle p95 TTFT at most 200 ms, loaded p95 TTFT at most twice idle. The last line printed
is one JSON object.

    python -m bench.latency [--interactive 40] [--bulk 1000] [--bulk-tokens 256]
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from bench import workload
from bench.stack import service, upload_job, wait_job
from storage.ledger_stats import percentile
from storage.tables import LedgerEntry, Request

IDLE_TTFT_GOAL_S = 0.2
LOADED_TTFT_GOAL_RATIO = 2.0
SATURATE_TIMEOUT_S = 120
WAITS = 60  # long polls of 10 s each, at most, for one request's record
OPEN = ("queued", "running")


@dataclass(frozen=True, slots=True)
class Sample:
    ttft_s: float
    e2e_s: float
    ok: bool  # succeeded with exactly the tokens asked for
    submit_s: float  # the POST's answer (202)
    record_ttft_s: float  # what the record says: from the commit to the worker's first token


Measure = Callable[[httpx.Client, workload.Item], Sample | None]


def main() -> None:
    args = _parse()
    idle_items, loaded_items = (
        workload.workload(
            seed, args.interactive, prompt_words=(4, 24), output_tokens=(args.tokens,) * 2
        )
        for seed in (args.seed, args.seed + 1)
    )
    bulk = workload.workload(
        args.seed + 2, args.bulk, prompt_words=(8, 64), output_tokens=(args.bulk_tokens,) * 2
    )
    with (
        service() as stack,
        httpx.Client(base_url=stack.url, headers=stack.headers, timeout=60) as client,
    ):
        source, measure = _choose(client, idle_items[0])
        print(f"time to first token from: {source}")
        idle = [measure(client, item) for item in idle_items]
        job_id, _accept_s = upload_job(client, bulk)
        _wait_saturated(client, job_id, stack.spec.max_batch_size)
        loaded = _under_load(client, job_id, loaded_items, measure)
        bulk_open = _open(client, job_id)
        cancel_s, aborted = _cancel(stack.sessions, client, job_id)
        wait_job(client, job_id)
    figures: dict[str, Any] = {
        "ttft_source": source,
        "interactive": args.interactive,
        "tokens": args.tokens,
        "bulk": args.bulk,
        "bulk_tokens": args.bulk_tokens,
        "bulk_open_at_end": bulk_open,
        **_summary("idle", idle),
        **_summary("loaded", loaded),
        # From the cancel's answer until the worker has aborted (and charged) every request of
        # the job that was running: the engine work it stopped.
        "cancel_aborted": aborted,
        "cancel_to_engine_free_s": cancel_s,
    }
    idle_p95, loaded_p95 = figures["idle_ttft_p95_s"], figures["loaded_ttft_p95_s"]
    figures["ttft_p95_ratio"] = round(loaded_p95 / idle_p95, 3) if idle_p95 else None
    figures["idle_goal_met"] = idle_p95 <= IDLE_TTFT_GOAL_S
    figures["loaded_goal_met"] = loaded_p95 <= LOADED_TTFT_GOAL_RATIO * idle_p95
    _show(figures)


def _cancel(
    sessions: sessionmaker[Session], client: httpx.Client, job_id: uuid.UUID
) -> tuple[float | None, int]:
    """Cancel the job; seconds until the ledger has a ``cancelled`` attempt for each request
    that was running then, and how many there were."""
    running = select(Request.id).where(Request.job_id == job_id, Request.status == "running")
    with sessions() as session:
        held = set(session.scalars(running))
    client.post(f"/v1/jobs/{job_id}/cancel").raise_for_status()
    cancelled = time.monotonic()
    charged = select(func.count(func.distinct(LedgerEntry.request_id))).where(
        LedgerEntry.request_id.in_(held), LedgerEntry.outcome == "cancelled"
    )
    while time.monotonic() - cancelled < SATURATE_TIMEOUT_S:
        with sessions() as session:
            if (session.scalar(charged) or 0) >= len(held):
                return round(time.monotonic() - cancelled, 3), len(held)
        time.sleep(0.02)
    return None, len(held)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--interactive", type=int, default=40, help="Requests per phase.")
    parser.add_argument("--tokens", type=int, default=16, help="Each interactive output.")
    parser.add_argument("--bulk", type=int, default=1000, help="Lines of the loading job.")
    parser.add_argument("--bulk-tokens", type=int, default=256, help="Each bulk line's output.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def _show(figures: dict[str, Any]) -> None:
    for phase in ("idle", "loaded"):
        f = {k.removeprefix(f"{phase}_"): v for k, v in figures.items() if k.startswith(phase)}
        print(
            f"{phase}: TTFT p50 {f['ttft_p50_s']}s p95 {f['ttft_p95_s']}s, end to end p50 "
            f"{f['e2e_p50_s']}s p95 {f['e2e_p95_s']}s; submit p95 {f['submit_p95_s']}s, "
            f"record's TTFT p95 {f['record_ttft_p95_s']}s ({f['ok']} of {f['sent']} ok)"
        )
    print(
        f"loaded/idle p95 TTFT {figures['ttft_p95_ratio']} (goals: idle p95 <= "
        f"{IDLE_TTFT_GOAL_S}s, loaded <= {LOADED_TTFT_GOAL_RATIO}x idle)"
    )
    print(json.dumps(figures))


def _under_load(
    client: httpx.Client, job_id: uuid.UUID, items: list[workload.Item], measure: Measure
) -> list[Sample | None]:
    """One request at a time while the bulk job still has requests open."""
    samples = []
    for item in items:
        if not _open(client, job_id):
            print("bench: the bulk job ended before the loaded requests did; use more --bulk")
            break
        samples.append(measure(client, item))
    return samples


def _choose(client: httpx.Client, probe: workload.Item) -> tuple[str, Measure]:
    """The stream endpoint where it exists (tried on one request), else the record."""
    if _streamed(client, probe) is None:
        return "record", _recorded
    return "stream", _streamed


def _streamed(client: httpx.Client, item: workload.Item) -> Sample | None:
    """One request followed on its SSE stream; None where the endpoint answers 404."""
    clock = time.perf_counter()
    submitted = _submit(client, item, stream=True)
    if submitted is None:
        return None
    request_id, submit_s = submitted
    ttft = None
    record: dict[str, Any] = {}
    with client.stream("GET", f"/v1/requests/{request_id}/stream") as response:
        if response.status_code == 404:
            _await_record(client, request_id)
            return None
        response.raise_for_status()
        name = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line.removeprefix("event:").strip()
            elif line.startswith("data:") and name == "token" and ttft is None:
                ttft = time.perf_counter() - clock
            elif line.startswith("data:") and name == "result":
                record = json.loads(line.removeprefix("data:"))
            elif not line:
                name = None
    e2e = time.perf_counter() - clock
    # No token event before the result (the engine did not stream): the client saw it all then.
    return _sample(record, item, ttft=ttft if ttft is not None else e2e, e2e=e2e, submit_s=submit_s)


def _recorded(client: httpx.Client, item: workload.Item) -> Sample:
    submitted = _submit(client, item, stream=False)
    assert submitted is not None
    record = _await_record(client, submitted[0])
    latency = record["latency"]
    ttft = latency["ttft_s"] if latency["ttft_s"] is not None else latency["total_s"]
    return _sample(record, item, ttft=ttft, e2e=latency["total_s"], submit_s=submitted[1])


def _sample(
    record: dict[str, Any], item: workload.Item, *, ttft: float, e2e: float, submit_s: float
) -> Sample:
    usage = record.get("usage") or {}
    ok = record.get("status") == "succeeded" and usage.get("completion_tokens") == item.max_tokens
    record_ttft = (record.get("latency") or {}).get("ttft_s")
    return Sample(ttft, e2e, ok, submit_s, record_ttft if record_ttft is not None else e2e)


def _submit(
    client: httpx.Client, item: workload.Item, *, stream: bool
) -> tuple[uuid.UUID, float] | None:
    """The request's id and how long the POST took; None where ``stream`` was asked for and
    the API does not know it."""
    body = {**item.body("interactive"), **({"stream": True} if stream else {})}
    clock = time.perf_counter()
    response = client.post("/v1/requests", json=body)
    if stream and response.status_code == 422 and "stream" in response.text:
        return None
    response.raise_for_status()
    return uuid.UUID(response.json()["id"]), time.perf_counter() - clock


def _await_record(client: httpx.Client, request_id: uuid.UUID) -> dict[str, Any]:
    for _ in range(WAITS):
        record: dict[str, Any] = client.get(
            f"/v1/requests/{request_id}", params={"wait": 10}
        ).json()
        if record["status"] not in OPEN:
            return record
    raise SystemExit(f"bench: request {request_id} did not finish in {WAITS * 10} s")


def _counts(client: httpx.Client, job_id: uuid.UUID) -> dict[str, int]:
    counts: dict[str, int] = client.get(f"/v1/jobs/{job_id}").json()["counts"]
    return counts


def _open(client: httpx.Client, job_id: uuid.UUID) -> bool:
    return sum(_counts(client, job_id).get(status, 0) for status in OPEN) > 0


def _wait_saturated(client: httpx.Client, job_id: uuid.UUID, max_num_seqs: int) -> None:
    """Until the worker has taken a full engine's worth of the job (or some finished)."""
    deadline = time.monotonic() + SATURATE_TIMEOUT_S
    while time.monotonic() < deadline:
        counts = _counts(client, job_id)
        if counts.get("running", 0) >= max_num_seqs or counts.get("succeeded", 0):
            return
        time.sleep(0.05)
    raise SystemExit(f"bench: the bulk job did not start within {SATURATE_TIMEOUT_S} s")


def _summary(phase: str, samples: list[Sample | None]) -> dict[str, Any]:
    good = [s for s in samples if s is not None and s.ok]
    figures: dict[str, Any] = {f"{phase}_sent": len(samples), f"{phase}_ok": len(good)}
    for name in ("ttft", "e2e", "submit", "record_ttft"):
        values = sorted(getattr(s, f"{name}_s") for s in good)
        for pct in (50, 95):
            figures[f"{phase}_{name}_p{pct}_s"] = round(percentile(values, pct), 4)
    return figures


if __name__ == "__main__":
    main()
