"""What submitting needs, built once per process and passed in: :func:`build_services` is the
one place it is built (the API, the embedded demo, evaluation runs and benchmarks all call it).
"""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from router import RouterConfig, load_config
from storage.db import make_engine, make_sessionmaker
from submission.limits import Limits
from tasks.app import create_celery
from tasks.breaker import Breaker
from weights.paths import resolve_model_path
from weights.tokens import PromptMeter


@dataclass(frozen=True, slots=True)
class Services:
    """Config, database, broker producer, token meters, and the limits checked on the way in."""

    settings: Settings
    config: RouterConfig
    sessions: sessionmaker[Session]
    celery: Celery
    meters: dict[str, PromptMeter]
    # Cooled-down models, for moving down a route's chain at submit.
    breaker: Breaker | None = None
    limits: Limits | None = None  # backpressure; None admits everything

    def use_config(self, config: RouterConfig) -> None:
        """Put a reloaded config in force (``submission.live_config``): whatever holds these
        services reads it from the next request on. Its models are the ones loaded at start."""
        object.__setattr__(self, "config", config)

    def dispose(self) -> None:
        """Close the database pool (the broker pool closes with the Celery app)."""
        self.sessions.kw["bind"].dispose()
        if self.breaker is not None:
            self.breaker.close()


def build_services(settings: Settings) -> Services:
    """Load the config, open the database pool and the broker producer, load the tokenizers."""
    config = load_config(settings.config)
    meters = {
        name: PromptMeter(resolve_model_path(spec.path, settings))
        for name, spec in config.models.items()
    }
    sessions = make_sessionmaker(make_engine(settings.database_url))
    return Services(
        settings=settings,
        config=config,
        sessions=sessions,
        celery=create_celery(settings, config),
        meters=meters,
        limits=Limits.create(settings, sessions),
        breaker=Breaker.create(settings, config.breaker),
    )
