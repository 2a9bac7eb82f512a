"""The embedded default: `inferq demo` on SQLite, the in-process broker and an in-process
worker on the tiny model, as a user runs it first."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from jsonschema import Draft202012Validator

from inferq.demo import SCHEMA
from tests.conftest import MODELS_DIR


def test_demo_runs_the_extraction_job_embedded(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env.update(INFERQ_CACHE_DIR=str(tmp_path), INFERQ_MODELS_DIR=str(MODELS_DIR))
    done = subprocess.run(
        [sys.executable, "-m", "inferq.cli", "--log-level", "WARNING", "demo", "--limit", "24"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for figure in ("succeeded / failed", "requests/s", "latency p50 / p95", "cost per successful"):
        assert figure in done.stdout
    assert "24 / 0" in done.stdout

    import json

    validator = Draft202012Validator(json.loads(SCHEMA.read_text()))
    with sqlite3.connect(tmp_path / "inferq.db") as db:
        rows = db.execute("SELECT status, output FROM requests").fetchall()
        ledger = db.execute("SELECT count(*), max(batch_size) FROM ledger").fetchone()
    assert len(rows) == 24 and {status for status, _ in rows} == {"succeeded"}
    assert all(not list(validator.iter_errors(json.loads(output))) for _, output in rows)
    assert ledger[0] == 24 and ledger[1] > 1
