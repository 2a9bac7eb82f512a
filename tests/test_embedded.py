"""The embedded default: `inferq demo` on SQLite, the in-process broker and an in-process
worker, running the trained tiny extractor that ships with the package, as a user runs it
first."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

from jsonschema import Draft202012Validator

from inferq.demo import PRODUCTS, SAMPLE_ROWS, SCHEMA
from inferq.training.train import (
    SHIPPED_MARKER,
    SHIPPED_NAME,
    SHIPPED_PATH,
    ensure_shipped_model,
    pack_model,
)
from quality.scoring import normalise_value

LIMIT = 24


def test_demo_runs_the_trained_extractor_and_keeps_library_noise_in_its_log(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env.update(INFERQ_CACHE_DIR=str(tmp_path), INFERQ_MODELS_DIR=str(tmp_path / "models"))
    env["COLUMNS"] = "100"  # the tables' width, whatever the terminal running the tests
    done = subprocess.run(
        [sys.executable, "-m", "inferq.cli", "demo", "--limit", str(LIMIT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log_path = tmp_path / "demo.log"
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + log[-3000:]

    # The libraries' logs and warnings went to the log the demo names, none to the terminal.
    assert done.stderr == ""
    assert f"Logs and warnings of vLLM, torch and transformers: {log_path}" in done.stdout
    assert re.search(r"^\S+ \S+ WARNING vllm\.", log, re.MULTILINE), log[:3000]
    logged = {line.strip() for line in log.splitlines() if line.strip()}
    shown = {line.strip() for line in done.stdout.splitlines() if line.strip()}
    assert not logged & shown
    assert not re.search(r"WARNING|INFO |Warning", done.stdout)

    # The trained model ran: the shipped file, unpacked into the model cache.
    model_dir = tmp_path / "models" / SHIPPED_NAME
    assert f"unpacked to {model_dir}" in done.stdout
    digest = hashlib.sha256(SHIPPED_PATH.read_bytes()).hexdigest()
    assert (model_dir / SHIPPED_MARKER).read_text() == digest
    assert f"'model': '{model_dir}'" in log  # what vLLM was given

    validator = Draft202012Validator(json.loads(SCHEMA.read_text()))
    with sqlite3.connect(tmp_path / "inferq.db") as db:
        rows = db.execute("SELECT item_id, status, output FROM requests ORDER BY line").fetchall()
        ledger = db.execute("SELECT count(*), max(batch_size) FROM ledger").fetchone()
    assert len(rows) == LIMIT and {status for _, status, _ in rows} == {"succeeded"}
    outputs = {item_id: json.loads(output) for item_id, _, output in rows}
    assert all(not list(validator.iter_errors(output)) for output in outputs.values())
    assert ledger[0] == LIMIT and ledger[1] > 1

    # Field accuracy against the file's labels: printed, and what the stored answers give.
    items = [json.loads(line) for line in PRODUCTS.read_text().splitlines()][:LIMIT]
    right = [
        normalise_value(outputs[item["id"]].get(key)) == normalise_value(value)
        for item in items
        for key, value in item["attributes"].items()
    ]
    accuracy = sum(right) / len(right)
    assert accuracy >= 0.85, accuracy  # random weights score 0.00
    printed = re.search(r"field accuracy \(mean\)\s*│\s*([0-9.]+)", done.stdout)
    assert printed, done.stdout
    assert float(printed[1]) == round(accuracy, 3)
    assert "In-distribution" in done.stdout

    # Sample rows: the first products' inputs and their extracted attributes.
    assert "sample rows" in done.stdout
    for item in items[:SAMPLE_ROWS]:
        assert item["id"] in done.stdout
        assert item["text"][:20] in done.stdout
        for key, value in outputs[item["id"]].items():
            assert f"{key}: {value}" in done.stdout

    # The summary the demo always printed.
    for figure in ("succeeded / failed", "requests/s", "latency p50 / p95", "cost per successful"):
        assert figure in done.stdout
    assert f"{LIMIT} / 0" in done.stdout


def test_the_shipped_model_is_small_and_repacks_to_the_same_bytes(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    assert SHIPPED_PATH.stat().st_size < 10_000_000
    folder = ensure_shipped_model(tmp_path / "models")
    assert folder == tmp_path / "models" / SHIPPED_NAME
    names = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    # What pack_model writes from the unpacked folder is the shipped file, byte for byte, so
    # `python -m inferq.training.train` reproduces it from a training run with the same result.
    repacked = pack_model(folder, tmp_path / "repacked.safetensors")
    assert repacked.read_bytes() == SHIPPED_PATH.read_bytes()

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer)
    assert tokenizer.chat_template and tokenizer.eos_token == "</s>"
    # Unpacking again is a no-op while the shipped file is unchanged.
    before = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_shipped_model(tmp_path / "models") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
