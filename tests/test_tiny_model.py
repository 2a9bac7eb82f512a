"""The offline tiny model and the sample data: built, complete, reusable and consistent.

No vLLM here (other tests load it); transformers alone is enough to check the folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from weights import tiny
from weights.tiny import MODEL_NAME, ensure_tiny_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "inferq" / "data"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield ensure_tiny_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def test_folder_holds_config_weights_and_tokenizer(model_dir: Path) -> None:
    assert model_dir.name == MODEL_NAME
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        tiny.MARKER_FILE,
    ):
        assert (model_dir / name).is_file(), name
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 2
    assert config["max_position_embeddings"] == 1024
    # Nothing but the model folder and the lock file is left behind.
    assert sorted(p.name for p in model_dir.parent.iterdir()) == [f".{MODEL_NAME}.lock", MODEL_NAME]


def test_tokenizer_round_trips_awkward_text(tokenizer: PreTrainedTokenizerBase) -> None:
    text = (
        'Colour: "navy" {"brand": "Maison Brûlé", "size": "EU 42"} — 20% off €12.99 '
        "東京 😀\n\ttabs  and  double spaces, a \\ backslash and a \x07 bell "
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    product = json.loads((DATA / "products.jsonl").read_text().splitlines()[0])["text"]
    assert tokenizer.decode(tokenizer.encode(product, add_special_tokens=False)) == product


def test_chat_template_renders_generation_prompt(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "system", "content": "Reply in JSON."}, {"role": "user", "content": "hi"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|system|>\nReply in JSON.</s>\n<|user|>\nhi</s>\n<|assistant|>\n"
    without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not without.endswith("<|assistant|>\n")
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") in ids


def test_vocab_and_special_ids_match_config(
    model_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert len(tokenizer) == config["vocab_size"] == tiny.VOCAB_SIZE
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[key] == generation[key] == getattr(tokenizer, key)
    assert tokenizer.model_max_length == config["max_position_embeddings"]


def test_model_loads_and_runs(model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    batch = tokenizer(["hello", "a longer prompt"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == len(tokenizer)


def test_second_call_reuses_the_model(model_dir: Path) -> None:
    weights = model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    started = time.perf_counter()
    assert ensure_tiny_model(model_dir.parent) == model_dir
    assert time.perf_counter() - started < 0.5
    assert weights.stat().st_mtime_ns == before


def _fake_build(calls: list[Path], delay: float = 0.0) -> Callable[..., None]:
    """A stand-in for the slow build that writes just what marks a folder complete."""

    def build(target: Path, *, seed: int = 0) -> None:
        calls.append(target)
        time.sleep(delay)
        for name in tiny.REQUIRED_FILES:
            (target / name).write_text("{}")
        marker = {"recipe_version": tiny.RECIPE_VERSION, "seed": seed}
        (target / tiny.MARKER_FILE).write_text(json.dumps(marker))

    return build


def test_incomplete_folder_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(tiny, "build_tiny_model", _fake_build(calls))
    half = tmp_path / MODEL_NAME
    half.mkdir()
    (half / "config.json").write_text("{}")  # a crash of someone else's hand-made copy
    (tmp_path / f".{MODEL_NAME}.tmp-crashed").mkdir()  # a crashed build's leftovers

    assert ensure_tiny_model(tmp_path) == half
    assert len(calls) == 1
    assert (half / tiny.MARKER_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{MODEL_NAME}.lock", MODEL_NAME]


def test_concurrent_callers_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(tiny, "build_tiny_model", _fake_build(calls, delay=0.3))
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_tiny_model(tmp_path)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [tmp_path / MODEL_NAME] * 4
    assert len(calls) == 1


def test_products_match_schema() -> None:
    from jsonschema import Draft202012Validator

    schema = json.loads((DATA / "product_schema.json").read_text())
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema)
    lines = (DATA / "products.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 200
    ids = set()
    for line in lines:
        product = json.loads(line)
        ids.add(product["id"])
        assert 80 <= len(product["text"]) <= 300
        validator.validate(product["attributes"])
        for value in product["attributes"].values():
            assert value.lower() in product["text"].lower()
    assert len(ids) == len(lines)


def test_products_file_matches_its_generator() -> None:
    generated = subprocess.run(
        [sys.executable, str(REPO / "bench" / "make_products.py")],
        check=True,
        capture_output=True,
    ).stdout
    assert generated == (DATA / "products.jsonl").read_bytes()
