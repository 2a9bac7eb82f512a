"""`inferq submit --wait`, `inferq jobs` and `inferq results` against the running API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from jsonschema import Draft202012Validator

DATA = Path(__file__).parents[1] / "inferq" / "data"


def inferq(args: list[str], api_url: str, api_key: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env.update(INFERQ_API_URL=api_url, INFERQ_API_KEY=api_key)
    return subprocess.run(
        [sys.executable, "-m", "inferq.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_submit_wait_writes_results_and_lists_the_job(
    api_url: str, api_key: str, tmp_path: Path
) -> None:
    lines = [*(DATA / "products.jsonl").read_text().splitlines()[:30], "{not json"]
    source = tmp_path / "catalogue.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    schema = DATA / "product_schema.json"
    done = inferq(
        [
            "submit",
            str(source),
            "--task",
            "extract",
            "--schema",
            str(schema),
            "--wait",
            "-o",
            str(out),
        ],
        api_url,
        api_key,
    )
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip().splitlines()[-1]
    assert "30 items accepted, 1 bad lines" in done.stderr and "completed" in done.stderr

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [json.loads(line)["id"] for line in lines[:30]]
    validator = Draft202012Validator(json.loads(schema.read_text()))
    assert all(
        r["status"] == "succeeded" and not list(validator.iter_errors(r["output"])) for r in rows
    )

    listed = inferq(["jobs"], api_url, api_key)
    assert listed.returncode == 0 and job_id in listed.stdout and "completed" in listed.stdout
    errors = inferq(["results", job_id, "--errors"], api_url, api_key)
    assert errors.returncode == 0
    assert json.loads(errors.stdout.splitlines()[0])["line"] == 31


def test_submit_refuses_a_bad_schema_file_and_a_missing_key(api_url: str, tmp_path: Path) -> None:
    source = tmp_path / "items.jsonl"
    source.write_text('{"id": "a", "text": "x"}\n')
    bad_schema = tmp_path / "schema.json"
    bad_schema.write_text("{oops")
    refused = inferq(
        ["submit", str(source), "--task", "extract", "--schema", str(bad_schema)], api_url, "key"
    )
    assert refused.returncode == 2 and "not a readable JSON file" in refused.stderr
    no_key = inferq(["jobs"], api_url, "")
    assert no_key.returncode == 1 and "INFERQ_API_KEY" in no_key.stderr
