"""The API process's memory and time while it takes large uploads.

    python -m bench.upload_memory [--mb 199] [--skip-accepted]

Starts `inferq api` alone (no worker: nothing here needs a result) against a throwaway
Postgres database and Redis db 12, as the other benchmarks do, then sends, one at a time:

* ``jobs-tiny``: ``POST /v1/jobs`` (multipart) with ``--mb`` MB of ``1\\n`` lines;
* ``files-tiny``: the same file to ``POST /v1/files``;
* ``jobs-json``: a JSON body of the same size to ``POST /v1/jobs``;
* ``files-big-lines``: a file of the same size within the line limit (lines of about 1 kB),
  accepted; then ``batches-big-lines``, a batch created from it (answered ``validating``;
  memory is watched until its first lines are admitted in the background, at most 120 s:
  ``admitted`` says whether they were), and
  ``download``, the file read back through ``/v1/files/{id}/content``.

For each it prints the status, the seconds until the answer and the API process's peak RSS
growth over its RSS just before (sampled every 10 ms from /proc). The last line is one JSON
object. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench.stack import CONFIG, database, service_env, stop
from core.settings import Settings
from storage.db import make_engine, make_sessionmaker
from storage.tenants import create_tenant

PORT = 8766
MB = 1_000_000
START_TIMEOUT_S = 120
ADMIT_WATCH_S = 120  # how long memory is watched for the first admitted chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=199, help="Upload size in MB (10^6 bytes).")
    parser.add_argument("--skip-accepted", action="store_true", help="Only the refused uploads.")
    args = parser.parse_args()
    size = args.mb * MB
    admin = os.environ.get("INFERQ_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    broker = os.environ.get("INFERQ_BENCH_BROKER_URL", "redis://127.0.0.1:6379/12")
    figures: dict[str, dict[str, float | int]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="inferq-upload-") as folder,
        database(admin) as database_url,
    ):
        settings = Settings(database_url=database_url, broker_url=broker, config=CONFIG)
        tiny = _write(Path(folder) / "tiny.jsonl", b"1\n", size)
        with _api(settings) as (pid, client):
            spec = json.dumps({"task": "complete"})

            def post_job() -> httpx.Response:
                with tiny.open("rb") as handle:
                    files = {"file": ("tiny.jsonl", handle, "application/x-ndjson")}
                    return client.post("/v1/jobs", data={"job": spec}, files=files)

            figures["jobs-tiny"] = _measure(pid, post_job)
            figures["files-tiny"] = _measure(pid, lambda: _post_file(client, tiny))
            figures["jobs-json"] = _measure(pid, lambda: _post_json(client, size))
            if not args.skip_accepted:
                _accepted(pid, client, _big_lines(Path(folder) / "big.jsonl", size), figures)
    for name, figure in figures.items():
        print(f"{name:18} {figure['status']}  {figure['seconds']:6.2f} s  +{figure['rss_mb']} MB")
    print(json.dumps({"upload_mb": args.mb, **figures}))


def _accepted(
    pid: int, client: httpx.Client, path: Path, figures: dict[str, dict[str, float | int]]
) -> None:
    answers: dict[str, httpx.Response] = {}

    def upload() -> httpx.Response:
        answers["file"] = _post_file(client, path)
        return answers["file"]

    figures["files-big-lines"] = _measure(pid, upload)
    file_id = answers["file"].json()["id"]

    def batch() -> httpx.Response:
        body = {
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        answers["batch"] = client.post("/v1/batches", json=body)
        return answers["batch"]

    def admitted() -> None:  # the admitter's first chunk: it read the stored lines
        batch_id = answers["batch"].json()["id"]
        deadline = time.monotonic() + ADMIT_WATCH_S
        while client.get(f"/v1/batches/{batch_id}").json()["status"] == "validating":
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        answers["admitted"] = answers["batch"]

    figures["batches-big-lines"] = _measure(pid, batch, settle=admitted)
    figures["batches-big-lines"]["admitted"] = int("admitted" in answers)
    if answers["batch"].status_code == 200:
        client.post(f"/v1/batches/{answers['batch'].json()['id']}/cancel")

    def download() -> httpx.Response:
        with client.stream("GET", f"/v1/files/{file_id}/content") as response:
            received = sum(len(chunk) for chunk in response.iter_bytes())
        assert received == path.stat().st_size, (received, path.stat().st_size)
        return response

    figures["download"] = _measure(pid, download)


def _post_file(client: httpx.Client, path: Path) -> httpx.Response:
    with path.open("rb") as handle:
        files = {"file": (path.name, handle, "application/x-ndjson")}
        return client.post("/v1/files", data={"purpose": "batch"}, files=files)


def _post_json(client: httpx.Client, size: int) -> httpx.Response:
    head, tail = b'{"task": "complete", "items": [', b"1]}"
    body = head + b"1," * ((size - len(head) - len(tail)) // 2) + tail
    headers = {"content-type": "application/json"}
    return client.post("/v1/jobs", content=body, headers=headers)


def _measure(
    pid: int, send: Callable[[], httpx.Response], *, settle: Callable[[], None] | None = None
) -> dict[str, float | int]:
    """Status, seconds to the answer, and peak RSS growth (MB) of ``pid`` while it ran and
    until ``settle`` returns (what the API does in the background after answering)."""
    before = _rss(pid)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    clock = time.perf_counter()
    response = send()
    seconds = time.perf_counter() - clock
    if settle is not None:
        settle()
    time.sleep(0.2)  # what the answer left behind still counts
    done.set()
    sampler.join()
    return {
        "status": response.status_code,
        "seconds": round(seconds, 2),
        "rss_mb": round((peak[0] - before) / MB),
    }


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _write(path: Path, line: bytes, size: int) -> Path:
    block = line * (MB // len(line))
    with path.open("wb") as handle:
        for _ in range(size // len(block)):
            handle.write(block)
    return path


def _big_lines(path: Path, size: int) -> Path:
    """A Batch API file of ``size`` bytes in lines of about 1 kB (within the line limit)."""
    with path.open("wb") as handle:
        number, written = 0, 0
        while written < size - 2000:
            body = {"model": "tiny", "messages": [{"role": "user", "content": "x " * 450}]}
            line = {
                "custom_id": f"r{number}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": body,
            }
            raw = json.dumps(line).encode() + b"\n"
            handle.write(raw)
            number, written = number + 1, written + len(raw)
    return path


@contextmanager
def _api(settings: Settings) -> Iterator[tuple[int, httpx.Client]]:
    """`inferq api` alone; its pid and a client with a fresh tenant's key."""
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine).begin() as session:
        _tenant, key = create_tenant(session, "bench-uploads")
    engine.dispose()
    command = [sys.executable, "-m", "inferq.cli", "--log-level", "WARNING", "api"]
    log = Path(tempfile.mkstemp(prefix="inferq-upload-api-", suffix=".log")[1])
    process = subprocess.Popen(
        [*command, "--port", str(PORT)],
        env={**service_env(settings), "INFERQ_RECONCILER": "false"},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{PORT}"
    headers = {"Authorization": f"Bearer {key}"}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not _healthy(client):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"bench: the API did not start; log in {log}")
                time.sleep(0.3)
            yield process.pid, client
    finally:
        stop([process])


def _healthy(client: httpx.Client) -> bool:
    try:
        return client.get("/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
