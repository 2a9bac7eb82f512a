"""The models-and-routes file: one YAML document, validated when a process starts.

Swapping the model behind a task kind is an edit here, never a code change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from inferq.enums import TaskKind

BUILTIN_TINY = "builtin:tiny"


class ConfigError(ValueError):
    """The config file is unreadable or inconsistent; the message names file, key and reason."""


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: Literal["vllm", "scripted"]
    # A folder, a hub id already in the local cache, or ``builtin:tiny`` (built on first use).
    path: str = BUILTIN_TINY
    max_model_len: int = Field(default=512, gt=0)
    max_batch_size: int = Field(default=64, gt=0)
    batch_window_ms: int = Field(default=50, ge=0)
    price_per_gpu_hour: float = Field(default=0.0, ge=0)
    gpu_count: int = Field(default=1, ge=0)
    # Passed to the engine adapter as they are (e.g. dtype, structured-output backend, script).
    options: dict[str, Any] = Field(default_factory=dict)


class RouteSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    task: TaskKind | Literal["*"]
    model: str
    # Routes are tried in file order; a route applies while the score is at most this.
    max_complexity: float = Field(default=1.0, ge=0, le=1)
    fallbacks: tuple[str, ...] = ()


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, ModelSpec]
    routes: tuple[RouteSpec, ...]

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


def _describe(err: Any) -> str:
    message = str(err["msg"]).removeprefix("Value error, ")
    where = ".".join(str(part) for part in err["loc"])
    return f"{where}: {message}" if where else message
