"""A short training run lowers the loss, and what it saves loads and runs in real vLLM."""

from __future__ import annotations

import json
from pathlib import Path

from inferq.training.extract_eval import measure_extraction
from inferq.training.train import (
    SCHEMA_PATH,
    TrainConfig,
    encode_example,
    extract_target,
    held_out_products,
    products,
    train_tiny,
)


def test_examples_follow_the_extract_prompt_and_skip_held_out_texts() -> None:
    from transformers import AutoTokenizer

    from tests.conftest import MODELS_DIR
    from weights.tiny import ensure_tiny_model

    held_out = held_out_products()
    texts = {item["text"] for item in held_out}
    fresh = products(1, 50, exclude=texts)
    assert len(fresh) == 50 and not texts & {item["text"] for item in fresh}

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_tiny_model(MODELS_DIR)))
    item = held_out[0]
    ids, start = encode_example(tokenizer, json.loads(SCHEMA_PATH.read_text()), item)
    prompt = tokenizer.decode(ids[:start])
    assert prompt.endswith("<|assistant|>\n")
    assert "Extract these attributes as JSON: brand, colour, size, material." in prompt
    assert item["text"] in prompt
    assert tokenizer.decode(ids[start:]) == extract_target(item["attributes"]) + "</s>"
    assert json.loads(extract_target(item["attributes"])) == item["attributes"]


def test_short_training_lowers_loss_and_loads_in_vllm(tmp_path: Path) -> None:
    config = TrainConfig(
        steps=24, batch_size=8, examples=200, warmup=4, degraded_share=0.5, lr=3e-3
    )
    result = train_tiny(tmp_path, config)

    assert result.last_loss < 0.7 * result.first_loss, (result.first_loss, result.last_loss)
    for folder in (result.trained, result.degraded):
        assert (folder / "model.safetensors").is_file()
        assert (folder / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".*")), "temporary folders were left behind"

    items = held_out_products(8)
    measured = measure_extraction(result.trained, items, schema=json.loads(SCHEMA_PATH.read_text()))
    assert measured.scores.n == 8
    # Under the schema constraint even a barely trained model answers valid JSON.
    assert measured.scores.schema_valid == 1.0
