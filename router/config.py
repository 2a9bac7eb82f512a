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
    # Self-hosted models: what a token is reckoned to cost when admission reserves a request's
    # worst case against a tenant's budget, until the model's own ledger says (None: nothing).
    budget_price_per_million_tokens: float | None = Field(default=None, ge=0)
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


class CanaryAuto(BaseModel):
    """Decide the canary without a person: promote when its quality is not worse beyond the
    evaluation regression rule and its cost per success is lower; abort on a regression."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Successful requests each arm needs over the window before its cost is trusted.
    min_successes: int = Field(default=20, ge=1)
    window_s: float = Field(default=86400.0, gt=0)


class CanarySpec(BaseModel):
    """A candidate model taking ``share`` of a route's traffic, chosen per request id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    share: float
    auto: CanaryAuto | None = None

    @field_validator("share")
    @classmethod
    def _share_is_a_fraction(cls, share: float) -> float:
        if not 0.0 <= share <= 1.0:
            raise ValueError(
                f"must be between 0 and 1 (a fraction of the route's traffic), got {share}"
            )
        return share


class RouteSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    task: TaskKind | Literal["*"]
    model: str
    # How ``inferq canary`` names the route; unnamed, it is ``<task>-<index>`` (see ``label``).
    name: str | None = Field(default=None, min_length=1, max_length=100, pattern=r"^[\w.-]+$")
    canary: CanarySpec | None = None
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

    def label(self, index: int) -> str:
        """The route's name: its ``name``, else its task and place in the file (``extract-0``;
        ``any-2`` for task ``*``)."""
        if self.name is not None:
            return self.name
        task = "any" if self.task == "*" else TaskKind(self.task).value
        return f"{task}-{index}"


class BreakerSpec(BaseModel):
    """A model failing ``failures`` attempts in a row is skipped for ``cooldown_s``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    failures: int = Field(default=5, gt=0)
    cooldown_s: float = Field(default=30.0, gt=0)


class CompareTo(BaseModel):
    """A hosted model the report prices the same successful work at, per token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    price_per_million_input_tokens: float = Field(ge=0)
    price_per_million_output_tokens: float = Field(ge=0)


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, ModelSpec]
    routes: tuple[RouteSpec, ...]
    # ``package.module:function`` taking (task, input) and returning a score in [0, 1].
    scorer: str | None = None
    breaker: BreakerSpec = Field(default_factory=BreakerSpec)
    # The report: what the same work would have cost on a hosted model, and the currency
    # (ISO 4217 code) every price in this file is in.
    compare_to: CompareTo | None = None
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")

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

    @model_validator(mode="after")
    def _canaries_fit_their_routes(self) -> RouterConfig:
        labels = [spec.label(index) for index, spec in enumerate(self.routes)]
        for index, label in enumerate(labels):
            if label in labels[:index]:
                raise ValueError(f"routes.{index}.name: {label!r} names two routes")
        for index, spec in enumerate(self.routes):
            if spec.canary is None:
                continue
            where, candidate = f"routes.{index}.canary.model", spec.canary.model
            if candidate not in self.models:
                known = ", ".join(sorted(self.models))
                raise ValueError(f"{where}: unknown model {candidate!r}; configured: {known}")
            if candidate == spec.model:
                raise ValueError(f"{where}: the candidate {candidate!r} is the route's own model")
            admitted = self.models[spec.model].max_model_len
            window = self.models[candidate].max_model_len
            if window < admitted:
                raise ValueError(
                    f"{where}: candidate {candidate!r} has max_model_len {window}, shorter than "
                    f"the {admitted} tokens the route admits (its model {spec.model!r})"
                )
        return self

    def find_route(self, name: str) -> tuple[int, RouteSpec]:
        """The route called ``name`` (see :meth:`RouteSpec.label`), with its index."""
        for index, spec in enumerate(self.routes):
            if spec.label(index) == name:
                return index, spec
        known = ", ".join(spec.label(i) for i, spec in enumerate(self.routes))
        raise ConfigError(f"no route named {name!r}; routes: {known}")


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


def model_kind_problem(spec: ModelSpec, model: str, *, embedding: bool) -> str | None:
    """Why ``model`` cannot serve an embedding (``embedding``) or a generation, or None. A
    vLLM model configured with ``runner: pooling`` embeds and only embeds; the scripted engine
    does both (for tests)."""
    pooling = spec.options.get("runner") == "pooling"
    if embedding and not (pooling or spec.engine == "scripted"):
        return f"model {model!r} is not an embedding model (configure one with runner: pooling)"
    if not embedding and pooling:
        return f"model {model!r} is an embedding model; use /v1/embeddings"
    return None


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
