"""The models-and-routes file: one YAML document, validated when a process starts.

Swapping the model behind a task kind is an edit here, never a code change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from core.enums import TaskKind
from router.scorer import load_scorer, score_complexity

BUILTIN_TINY = "builtin:tiny"
# Engines that call an HTTP API: priced per token, no GPU of ours.
HOSTED_ENGINES = frozenset({"openai"})


class ConfigError(ValueError):
    """The config file is unreadable or inconsistent; the message names file, key and reason."""


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: Literal["vllm", "transformers", "openai", "scripted"]
    # A folder, a hub id already in the local cache, or ``builtin:tiny`` (built on first use).
    path: str = BUILTIN_TINY
    max_model_len: int = Field(default=512, gt=0)
    max_batch_size: int = Field(default=64, gt=0)
    batch_window_ms: int = Field(default=50, ge=0)
    price_per_gpu_hour: float = Field(default=0.0, ge=0)
    gpu_count: int = Field(default=1, ge=0)
    # Hosted (OpenAI-compatible) models: where, the env var holding the key, per-token prices.
    # ``path`` then only names the tokenizer the API counts prompt tokens with.
    base_url: str | None = None
    api_key_env: str | None = None
    price_per_million_input_tokens: float = Field(default=0.0, ge=0)
    price_per_million_output_tokens: float = Field(default=0.0, ge=0)
    # Passed to the engine adapter as they are (e.g. dtype, structured-output backend, script).
    options: dict[str, Any] = Field(default_factory=dict)
    # Weights quantized offline; checked against the folder's config.json when the file loads.
    quantization: Literal["none", "gptq", "awq"] = "none"
    # An engine call running longer than this counts as a timed-out attempt (None: no limit).
    timeout_s: float | None = Field(default=None, gt=0)
    # A failed attempt is retried on this model, up to max_attempts in all, after
    # retry_backoff_s, then twice that, and so on; then the route's chain takes over.
    max_attempts: int = Field(default=1, ge=1, le=10)
    retry_backoff_s: float = Field(default=1.0, ge=0)

    @model_validator(mode="after")
    def _quantization_matches_weights(self) -> ModelSpec:
        check_quantization(self.path, self.quantization)
        return self

    @model_validator(mode="after")
    def _hosted_has_endpoint(self) -> ModelSpec:
        if self.engine in HOSTED_ENGINES:
            if not self.base_url:
                raise ValueError(f"base_url: required for engine {self.engine!r}")
            if not self.options.get("model"):
                raise ValueError(f"options.model: required for engine {self.engine!r}")
        return self


class RouteSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    task: TaskKind | Literal["*"]
    model: str
    # Routes are tried in file order; a route applies while the score is at most this.
    max_complexity: float = Field(default=1.0, ge=0, le=1)
    fallbacks: tuple[str, ...] = ()
    # Messages waiting on the model's queue past which a request goes down the chain instead.
    max_queue_depth: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _chain_has_no_cycle(self) -> RouteSpec:
        chain = (self.model, *self.fallbacks)
        for at, name in enumerate(chain):
            if name in chain[:at]:
                raise ValueError(f"fallback cycle: {' -> '.join(chain[: at + 1])}")
        return self


class BreakerSpec(BaseModel):
    """A model failing ``failures`` attempts in a row is skipped for ``cooldown_s``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    failures: int = Field(default=5, gt=0)
    cooldown_s: float = Field(default=30.0, gt=0)


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, ModelSpec]
    routes: tuple[RouteSpec, ...]
    # ``package.module:function`` taking (task, input) and returning a score in [0, 1].
    scorer: str | None = None
    breaker: BreakerSpec = Field(default_factory=BreakerSpec)

    @field_validator("scorer")
    @classmethod
    def _scorer_imports(cls, path: str | None) -> str | None:
        if path is not None:
            load_scorer(path)
        return path

    def score(self, task: TaskKind, payload: dict[str, Any]) -> float:
        """The complexity of an input, by the configured scorer or the default heuristic."""
        scorer = score_complexity if self.scorer is None else load_scorer(self.scorer)
        return min(max(float(scorer(task, payload)), 0.0), 1.0)

    @model_validator(mode="after")
    def _routes_name_known_models(self) -> RouterConfig:
        for index, route in enumerate(self.routes):
            for name in (route.model, *route.fallbacks):
                if name not in self.models:
                    raise ValueError(f"routes.{index}: unknown model {name!r}")
        return self


def load_config(path: Path) -> RouterConfig:
    """Read and validate the config file, naming the file and the key on any error."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    try:
        return RouterConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_describe(err) for err in exc.errors())
        raise ConfigError(f"{path}: {problems}") from exc


def check_quantization(path: str, quantization: str) -> None:
    """Refuse a quantization the weights at ``path`` were not made with.

    vLLM would fail (or run garbage) only when the worker loads the model; the folder's
    ``config.json`` says at load time whether the weights are GPTQ or AWQ.
    """
    if quantization == "none":
        return
    if path == BUILTIN_TINY:
        raise ValueError(f"quantization {quantization!r}: {BUILTIN_TINY} is not quantized")
    config_file = Path(path).expanduser() / "config.json"
    try:
        declared = json.loads(config_file.read_text()).get("quantization_config") or {}
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"quantization {quantization!r} needs a local model folder with config.json "
            f"({config_file}: {exc})"
        ) from exc
    method = str(declared.get("quant_method", "none")).lower()
    if method != quantization:
        raise ValueError(
            f"quantization {quantization!r} does not match {config_file} "
            f"(quantization_config.quant_method is {method!r})"
        )


def _describe(err: Any) -> str:
    message = str(err["msg"]).removeprefix("Value error, ")
    where = ".".join(str(part) for part in err["loc"])
    return f"{where}: {message}" if where else message
