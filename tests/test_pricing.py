"""Pricing per attempt, and the config fields hosted models need."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.config import ConfigError, ModelSpec, load_config
from workers.pricing import price_attempt


def test_self_hosted_pays_for_gpu_seconds() -> None:
    spec = ModelSpec(engine="vllm", price_per_gpu_hour=3.6, price_per_million_input_tokens=9.0)
    price = price_attempt(spec, gpu_seconds=2.5, prompt_tokens=1000, completion_tokens=10)
    assert price.gpu_seconds == 2.5
    assert price.cost == pytest.approx(2.5 * 3.6 / 3600)


def test_hosted_pays_per_token_and_uses_no_gpu() -> None:
    spec = ModelSpec(
        engine="openai",
        base_url="https://api.example.com/v1",
        price_per_gpu_hour=100.0,
        price_per_million_input_tokens=0.15,
        price_per_million_output_tokens=0.6,
        options={"model": "gpt-4o-mini"},
    )
    price = price_attempt(spec, gpu_seconds=1.0, prompt_tokens=1200, completion_tokens=300)
    assert price.gpu_seconds == 0.0
    assert price.cost == pytest.approx(1200 * 0.15e-6 + 300 * 0.6e-6)
    assert price_attempt(spec, gpu_seconds=0, prompt_tokens=0, completion_tokens=0).cost == 0


def _load(tmp_path: Path, model: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"models:\n  remote: {model}\nroutes:\n  - {{task: '*', model: remote}}\n")
    load_config(path)


def test_hosted_model_without_base_url_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"models\.remote: base_url: required"):
        _load(tmp_path, "{engine: openai, options: {model: m}}")
    with pytest.raises(ConfigError, match=r"models\.remote: options\.model: required"):
        _load(tmp_path, "{engine: openai, base_url: 'http://127.0.0.1:1/v1'}")
    with pytest.raises(ConfigError, match="price_per_million_output_tokens"):
        _load(
            tmp_path,
            "{engine: openai, base_url: 'http://h/v1', options: {model: m},"
            " price_per_million_output_tokens: -1}",
        )


def test_new_engines_load(tmp_path: Path) -> None:
    _load(tmp_path, "{engine: transformers, options: {dtype: float32}}")
    _load(tmp_path, "{engine: openai, base_url: 'http://h/v1', options: {model: m}}")
    with pytest.raises(ConfigError, match="engine"):
        _load(tmp_path, "{engine: tgi}")
