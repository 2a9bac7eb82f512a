"""The router is a pure function over the config; the config is checked when it loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.enums import TaskKind
from core.settings import DEFAULT_CONFIG
from router import ConfigError, RouterConfig, RoutingError, load_config, route, skip_unavailable
from router.scorer import score_complexity

CONFIG = RouterConfig.model_validate(
    {
        "models": {"small": {"engine": "scripted"}, "large": {"engine": "scripted"}},
        "routes": [
            {"task": "classify", "model": "small", "max_complexity": 0.5},
            {"task": "*", "model": "large", "fallbacks": ["small"]},
        ],
    }
)


def test_route_by_task_and_complexity() -> None:
    short = route(TaskKind.CLASSIFY, {"text": "x", "labels": ["a", "b"]}, tenant="t", config=CONFIG)
    assert short.model == "small"
    long_input = {"text": "word " * 2000, "labels": ["a", "b"]}
    long = route(TaskKind.CLASSIFY, long_input, tenant="t", config=CONFIG)
    assert long.complexity > 0.5 and long.model == "large" and long.fallbacks == ("small",)
    assert route(TaskKind.CHAT, {"messages": []}, tenant="t", config=CONFIG).model == "large"


def test_threshold_is_inclusive_at_its_edge() -> None:
    payload = {"text": "x", "labels": ["a", "b"]}
    score = score_complexity(TaskKind.CLASSIFY, payload)
    at_edge = CONFIG.model_copy(
        update={"routes": (CONFIG.routes[0].model_copy(update={"max_complexity": score}),)}
    )
    assert route(TaskKind.CLASSIFY, payload, tenant="t", config=at_edge).model == "small"
    below = CONFIG.model_copy(
        update={"routes": (CONFIG.routes[0].model_copy(update={"max_complexity": score - 1e-9}),)}
    )
    with pytest.raises(RoutingError, match="no route"):
        route(TaskKind.CLASSIFY, payload, tenant="t", config=below)


def test_model_override_must_be_configured() -> None:
    chosen = route(TaskKind.CHAT, {}, tenant="t", config=CONFIG, model_override="small")
    assert chosen.model == "small"
    with pytest.raises(RoutingError, match="unknown model 'nope'"):
        route(TaskKind.CHAT, {}, tenant="t", config=CONFIG, model_override="nope")


def test_default_config_serves_tiny() -> None:
    config = load_config(DEFAULT_CONFIG)
    assert route(TaskKind.EXTRACT, {"text": "x"}, tenant="t", config=config).model == "tiny"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "models: {a: {engine: vllm}}\nroutes: [{task: '*', model: b}]",
            "routes.0: unknown model 'b'",
        ),
        ("models: {a: {engine: magic}}\nroutes: []", "models.a.engine"),
        (
            "models: {a: {engine: vllm, price_per_gpu_hour: -1}}\nroutes: []",
            "models.a.price_per_gpu_hour",
        ),
        ("models: [oops", "cannot read config"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and message in str(info.value)


def difficulty(task: TaskKind, payload: dict[str, Any]) -> float:
    """A scorer for these tests: the input says its own complexity."""
    del task
    return float(payload.get("difficulty", 0.0))


TABLE = RouterConfig.model_validate(
    {
        "models": {
            "small": {"engine": "scripted"},
            "large": {"engine": "scripted"},
            "hosted": {"engine": "scripted"},
        },
        "scorer": "tests.test_router:difficulty",
        "routes": [
            {"task": "classify", "model": "small", "max_complexity": 0.6, "fallbacks": ["hosted"]},
            {"task": "expand", "model": "small", "fallbacks": ["large", "hosted"]},
            {"task": "chat", "model": "large", "fallbacks": ["hosted"]},
            {"task": "*", "model": "hosted"},
        ],
    }
)


@pytest.mark.parametrize(
    ("task", "difficulty_", "model", "fallbacks"),
    [
        (TaskKind.CLASSIFY, 0.0, "small", ("hosted",)),
        (TaskKind.CLASSIFY, 0.6, "small", ("hosted",)),  # the threshold itself routes small
        (TaskKind.CLASSIFY, 0.6000001, "hosted", ()),  # just above it does not
        (TaskKind.CLASSIFY, 1.0, "hosted", ()),
        (TaskKind.EXPAND, 1.0, "small", ("large", "hosted")),
        (TaskKind.CHAT, 0.3, "large", ("hosted",)),
        (TaskKind.EXTRACT, 0.0, "hosted", ()),
        (TaskKind.COMPLETE, 0.9, "hosted", ()),
    ],
)
def test_routing_table(
    task: TaskKind, difficulty_: float, model: str, fallbacks: tuple[str, ...]
) -> None:
    chosen = route(task, {"difficulty": difficulty_}, tenant="t", config=TABLE)
    assert (chosen.model, chosen.fallbacks) == (model, fallbacks)
    assert chosen.complexity == pytest.approx(difficulty_)


def test_scorer_output_is_clamped_to_the_unit_interval() -> None:
    assert route(TaskKind.CLASSIFY, {"difficulty": -3}, tenant="t", config=TABLE).complexity == 0
    assert route(TaskKind.CHAT, {"difficulty": 7}, tenant="t", config=TABLE).complexity == 1


def test_default_scorer_grows_with_length_and_structure() -> None:
    short = score_complexity(TaskKind.EXTRACT, {"text": "x"})
    long = score_complexity(TaskKind.EXTRACT, {"text": "x" * 2000})
    nested = score_complexity(TaskKind.EXTRACT, {"text": "x", "schema": {"a": {"b": {"c": {}}}}})
    assert 0.3 <= short < long < 1.0 and nested > short + 0.09
    # Length adds at most 0.5 over the task's floor (0.4 for chat).
    assert score_complexity(TaskKind.CHAT, {"text": "x" * 100_000}) == pytest.approx(0.9)


def test_skip_unavailable_walks_the_chain_and_records_why() -> None:
    chosen = route(TaskKind.EXPAND, {}, tenant="t", config=TABLE)
    down = {"small": "cooling down", "large": "queue depth 9 over the route's 2"}
    moved = skip_unavailable(chosen, lambda r: down.get(r.model))
    assert (moved.model, moved.fallbacks, moved.first_model) == ("hosted", (), "small")
    assert moved.reason == "small: cooling down; large: queue depth 9 over the route's 2"
    everything_down = skip_unavailable(chosen, lambda r: "down")
    assert everything_down.model == "hosted"  # the chain's end serves whatever its state
    assert skip_unavailable(chosen, lambda r: None) == chosen


def _models(**extra: Any) -> dict[str, Any]:
    return {"engine": "vllm", **extra}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {
                "models": {"a": _models()},
                "routes": [{"task": "*", "model": "a", "fallbacks": ["b"]}],
            },
            "routes.0: unknown model 'b'",
        ),
        (
            {
                "models": {"a": _models(), "b": _models()},
                "routes": [{"task": "*", "model": "a", "fallbacks": ["b", "a"]}],
            },
            "routes.0: fallback cycle: a -> b -> a",
        ),
        (
            {"models": {"a": _models(quantization="awq")}, "routes": []},
            "models.a: quantization 'awq': builtin:tiny is not quantized",
        ),
        (
            {"models": {"a": _models(quantization="int3")}, "routes": []},
            "models.a.quantization",
        ),
        (
            {"models": {"a": _models(timeout_s=0)}, "routes": []},
            "models.a.timeout_s",
        ),
        (
            {"models": {"a": _models()}, "routes": [], "scorer": "no_such_module:score"},
            "scorer: cannot import scorer 'no_such_module:score'",
        ),
        (
            {"models": {"a": _models()}, "routes": [], "scorer": "tests.test_router:nope"},
            "cannot import scorer 'tests.test_router:nope'",
        ),
        (
            {"models": {"a": _models()}, "routes": [], "scorer": "tests.test_router:TABLE"},
            "scorer 'tests.test_router:TABLE' is not callable",
        ),
        (
            {"models": {"a": _models()}, "routes": [], "breaker": {"cooldown_s": -1}},
            "breaker.cooldown_s",
        ),
        (
            {
                "models": {"a": _models()},
                "routes": [{"task": "*", "model": "a", "max_queue_depth": -1}],
            },
            "routes.0.max_queue_depth",
        ),
    ],
)
def test_bad_configs_name_file_key_and_reason(
    tmp_path: Path, raw: dict[str, Any], message: str
) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def _weights(folder: Path, quantization_config: dict[str, Any] | None) -> Path:
    folder.mkdir()
    config: dict[str, Any] = {"model_type": "llama"}
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("declared", "asked", "problem"),
    [
        (None, "awq", "quant_method is 'none'"),
        ({"quant_method": "gptq", "bits": 4}, "awq", "quant_method is 'gptq'"),
        ({"quant_method": "awq", "bits": 4}, "awq", None),
        ({"quant_method": "gptq", "bits": 4}, "gptq", None),
        (None, "none", None),
    ],
)
def test_quantization_is_checked_against_the_weights(
    tmp_path: Path, declared: dict[str, Any] | None, asked: str, problem: str | None
) -> None:
    folder = _weights(tmp_path / "weights", declared)
    path = tmp_path / "models.yaml"
    model = {"engine": "vllm", "path": str(folder), "quantization": asked}
    path.write_text(yaml.safe_dump({"models": {"m": model}, "routes": []}))
    if problem is None:
        assert load_config(path).models["m"].quantization == asked
        return
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"models.m: quantization '{asked}' does not match" in str(info.value)
    assert problem in str(info.value)


def test_quantization_needs_a_local_folder(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    model = {"engine": "vllm", "path": str(tmp_path / "missing"), "quantization": "gptq"}
    path.write_text(yaml.safe_dump({"models": {"m": model}, "routes": []}))
    with pytest.raises(ConfigError, match=r"needs a local model folder with config\.json"):
        load_config(path)


@pytest.mark.parametrize("command", [["api", "--port", "1"], ["worker", "--model", "a"]])
def test_the_api_and_workers_refuse_to_start_on_a_bad_config(
    tmp_path: Path, command: list[str]
) -> None:
    path = tmp_path / "models.yaml"
    raw = {"models": {"a": {"engine": "vllm", "quantization": "awq"}}, "routes": []}
    path.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, INFERQ_CONFIG=str(path), INFERQ_BROKER_URL="redis://127.0.0.1:1/0")
    done = subprocess.run(
        [sys.executable, "-m", "inferq.cli", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert f"{path}: models.a: quantization 'awq': builtin:tiny is not quantized" in done.stderr
