"""Fair sharing between tenants on one model, on the real vLLM engine (the tiny model).

Starts the same stack as bench.throughput (API + one ``tiny`` worker, own database) and three
tenants of its own, then measures the two properties the worker's fair turns give
(workers.fairness):

- **equal jobs started together**: two tenants upload ``--equal`` lines each at the same time;
  each job's time from the uploads to its last result, and the ratio of the shorter to the
  longer (goal: at least 0.8, i.e. within 20 %);
- **a small job behind a large one**: the small job (``--small`` lines) runs alone first, for
  its time on an idle worker; then a tenant uploads ``--large`` lines, and once ``--ahead`` of
  them are queued the small job is uploaded again by another tenant. Its time then, against
  alone (goal: about twice, as two tenants share the engine, not the queue ahead's drain
  time), and how many lines of the large job finished while it ran.

Every line asks for exactly ``--tokens`` output tokens (EOS ignored). The last line printed is
one JSON object.

    python -m bench.fairness [--equal 1000] [--large 20000] [--ahead 4000] [--small 100]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from typing import Any

import httpx
from sqlalchemy import func, select

from bench import workload
from bench.stack import Stack, service, upload_job, wait_job
from storage.tables import Request, as_utc
from storage.tenants import create_tenant

EQUAL_GOAL_RATIO = 0.8
QUEUE_TIMEOUT_S = 600


def main() -> None:
    args = _parse()
    with service() as stack:
        keys = [_tenant(stack, name) for name in ("equal-a", "equal-b", "large", "small")]
        figures: dict[str, Any] = {"tokens": args.tokens}
        figures |= _equal(stack, keys[:2], args.equal, args.tokens)
        figures |= _behind(stack, keys[2], keys[3], args)
    figures["equal_goal_met"] = figures["equal_ratio"] >= EQUAL_GOAL_RATIO
    print(json.dumps(figures))


def _equal(stack: Stack, keys: list[str], lines: int, tokens: int) -> dict[str, Any]:
    """Two tenants' equal jobs, uploaded at once; each one's seconds to its last result."""
    items = workload.fixed(lines, tokens)
    jobs: dict[str, uuid.UUID] = {}
    start = time.time()

    def upload(key: str) -> None:
        with _client(stack, key) as client:
            jobs[key] = upload_job(client, items)[0]

    threads = [threading.Thread(target=upload, args=(key,)) for key in keys]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = []
    for key in keys:
        with _client(stack, key) as client:
            wait_job(client, jobs[key])
        elapsed.append(_last_finished(stack, jobs[key]) - start)
    return {
        "equal_lines": lines,
        "equal_elapsed_s": [round(e, 2) for e in elapsed],
        "equal_ratio": round(min(elapsed) / max(elapsed), 3),
    }


def _behind(
    stack: Stack, large_key: str, small_key: str, args: argparse.Namespace
) -> dict[str, Any]:
    """The small job alone, then behind ``ahead`` queued lines of the large job."""
    small = workload.fixed(args.small, args.tokens)
    with _client(stack, small_key) as client:
        alone = _timed_job(stack, client, small)
    with _client(stack, large_key) as large_client, _client(stack, small_key) as client:
        large_job, _ = upload_job(large_client, workload.fixed(args.large, args.tokens))
        _wait_queued(stack, large_job, min(args.ahead, args.large))
        queued_ahead = _count(stack, large_job, Request.status == "queued")
        done = Request.finished_at.is_not(None)
        large_before = _count(stack, large_job, done)
        loaded = _timed_job(stack, client, small)
        large_during = _count(stack, large_job, done) - large_before
        large_client.post(f"/v1/jobs/{large_job}/cancel").raise_for_status()
        wait_job(large_client, large_job)
    return {
        "small_lines": args.small,
        "large_lines": args.large,
        "queued_ahead": queued_ahead,
        "small_alone_s": round(alone, 2),
        "small_behind_large_s": round(loaded, 2),
        "small_slowdown": round(loaded / alone, 2),
        # Lines of the large job that finished while the small one ran: about as many as
        # the small job has when they share, all of ``queued_ahead`` when it waits its turn.
        "large_done_while_small_ran": large_during,
    }


def _timed_job(stack: Stack, client: httpx.Client, items: list[workload.Item]) -> float:
    """Seconds from the upload to the job's last result."""
    start = time.time()
    job_id, _ = upload_job(client, items)
    wait_job(client, job_id)
    return _last_finished(stack, job_id) - start


def _wait_queued(stack: Stack, job_id: uuid.UUID, count: int) -> None:
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    while _count(stack, job_id, Request.status == "queued") < count:
        stack.check_alive()
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {count} lines of the large job were not queued in time")
        time.sleep(0.1)


def _count(stack: Stack, job_id: uuid.UUID, condition: Any) -> int:
    with stack.sessions() as session:
        query = select(func.count()).where(Request.job_id == job_id, condition)
        return int(session.scalar(query) or 0)


def _last_finished(stack: Stack, job_id: uuid.UUID) -> float:
    with stack.sessions() as session:
        last = session.scalar(select(func.max(Request.finished_at)).where(Request.job_id == job_id))
    assert last is not None
    return as_utc(last).timestamp()


def _tenant(stack: Stack, name: str) -> str:
    with stack.sessions.begin() as session:
        return create_tenant(session, f"bench-{name}")[1]


def _client(stack: Stack, key: str) -> httpx.Client:
    return httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--equal", type=int, default=1000, help="Lines of each equal job.")
    parser.add_argument("--large", type=int, default=20000, help="Lines of the large job.")
    parser.add_argument("--ahead", type=int, default=4000, help="Its lines queued first.")
    parser.add_argument("--small", type=int, default=100, help="Lines of the small job.")
    parser.add_argument("--tokens", type=int, default=16, help="Each line's output tokens.")
    return parser.parse_args()


if __name__ == "__main__":
    main()
