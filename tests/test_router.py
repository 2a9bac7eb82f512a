"""The router is a pure function over the config; the config is checked when it loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferq.enums import TaskKind
from inferq.settings import DEFAULT_CONFIG
from router import ConfigError, RouterConfig, RoutingError, load_config, route
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
    assert (short.model, short.queue) == ("small", "inferq.model.small")
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
