"""One worker process's runtime for one model: the engine, created once at start, and around
it the feed, the leases, the writer and the writer's hooks."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from core.enums import Outcome, Priority
from core.settings import Settings
from quality.pool import PoolSampler
from router.config import RouterConfig
from storage.ledger import Attempt
from tasks.app import publish_runs
from tasks.breaker import Breaker
from tasks.budget import TokenBudget
from tasks.contract import RunMessage
from tasks.streams import TokenEvent, create_publisher
from tasks.webhooks import publish_deliveries
from weights.paths import resolve_model_path
from workers.attempts import AttemptMaker
from workers.batcher import MicroBatcher, WorkItem
from workers.breaker import BreakerHook
from workers.drain import hand_back
from workers.engines import Engine, StepEngine, create_engine
from workers.executor import BatchExecutor
from workers.feeder import ContinuousFeeder, exit_wedged
from workers.holdings import Holdings
from workers.leases import Leases
from workers.streaming import TokenRelay
from workers.writer import BatchWriter


class WorkerRuntime:
    """Owns one model's engine; the consumer step hands it requests (:meth:`submit`).

    How requests reach the engine follows the engine's kind: a continuous engine (vLLM) is fed
    as requests arrive, and claims tenants' queued requests ahead of their messages for fair
    turns (``workers.feeder``, ``workers.fairness``); a static one gets micro-batches
    (``workers.batcher``, ``workers.executor``). Either way the writer commits results with
    their ledger rows, then runs its hooks, and only then does a request's future resolve.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        model: str,
        config: RouterConfig,
        sessions: sessionmaker[Session],
        worker_name: str,
        publish_deliveries: Callable[[list[uuid.UUID]], None],
        publish_runs: Callable[[list[RunMessage]], None] | None = None,
        leases: Leases | None = None,
        relay: TokenRelay | None = None,
        stall_s: float = 60.0,
        on_wedged: Callable[[str], None] = exit_wedged,
        holdings: Holdings | None = None,
    ) -> None:
        spec = config.models[model]
        self.holdings = holdings
        self._publish_runs = publish_runs
        self.leases = leases or Leases(sessions)
        self.model = model
        self.spec = spec
        self.engine = engine
        self.relay = relay
        self.writer = BatchWriter(sessions, publish_deliveries, publish_runs=publish_runs)
        make_attempt = AttemptMaker(model, spec, engine.name, worker_name)
        self.feed: MicroBatcher | ContinuousFeeder
        self._executor: BatchExecutor | None = None
        if isinstance(engine, StepEngine):
            self.feed = ContinuousFeeder(
                engine,
                spec=spec,
                make_attempt=make_attempt,
                writer=self.writer,
                claim=self.leases.claim,
                stopped=self.leases.stopped_among,
                relay=relay,
                stall_s=stall_s,
                on_wedged=on_wedged,
                name=f"inferq-engine-{model}",
                waiting=partial(self.leases.waiting, model),
                claim_ahead=self._claim_ahead,
            )
            self.leases.progressing = self.feed.progressing
            # Enough messages to fill the engine and a reserve; the intake claims no more.
            self.buffer_size = self.feed.intake.bound
        else:
            executor = BatchExecutor(
                engine,
                make_attempt=make_attempt,
                spec=spec,
                writer=self.writer,
                claim=self.leases.claim,
                stall_s=stall_s,
                on_wedged=on_wedged,
            )
            self.leases.progressing = executor.progressing
            self._executor = executor
            self.feed = MicroBatcher(
                executor,
                max_batch_size=spec.max_batch_size,
                window_s=spec.batch_window_ms / 1000,
                name=f"inferq-executor-{model}",
            )
            # One batch running, one filling, so the engine never waits.
            self.buffer_size = 2 * spec.max_batch_size

    @classmethod
    def create(
        cls,
        settings: Settings,
        config: RouterConfig,
        model: str,
        sessions: sessionmaker[Session],
        celery: Celery,
        *,
        current_config: Callable[[], RouterConfig] | None = None,
    ) -> WorkerRuntime:
        """Load the model's engine (once per process) and wire the runtime around it.

        ``current_config`` gives the config in force after a reload (``LiveConfig.current``);
        what the worker publishes down a chain reads it. The engine keeps the spec it loaded.
        """
        if model not in config.models:
            known = ", ".join(sorted(config.models))
            raise ValueError(f"unknown model {model!r}; configured: {known}")
        spec = config.models[model]
        engine = create_engine(spec, model_path=resolve_model_path(spec.path, settings))
        name = settings.worker_name or f"{model}@{socket.gethostname()}:{os.getpid()}"
        runtime = cls(
            engine,
            model=model,
            config=config,
            sessions=sessions,
            worker_name=name,
            publish_deliveries=partial(publish_deliveries, celery),
            publish_runs=_publisher(celery, current_config or (lambda: config)),
            leases=Leases.from_settings(settings, sessions, worker=name),
            relay=TokenRelay(create_publisher(settings), name=f"inferq-tokens-{model}"),
            stall_s=settings.engine_stall_s,
            holdings=Holdings.for_broker(celery, holder=name),
        )
        breaker = Breaker.create(settings, config.breaker)
        runtime.writer.add_commit_hook(BreakerHook(breaker, model))
        runtime.writer.add_commit_hook(TokenBudget.create(settings).settle)
        pool = PoolSampler.from_settings(settings)
        if pool is not None:
            runtime.writer.add_transaction_hook(partial(_sample_succeeded, pool))
        return runtime

    def start(self) -> None:
        self.leases.start()
        if self.holdings is not None:
            self.holdings.start()
        self.writer.start()
        if self.relay is not None:
            self.relay.start()
        self.feed.start()

    def progressing(self) -> bool:
        """False once the engine has been stuck past ``stall_s`` (the feed's or executor's
        check, which also stops lease renewal): what a liveness probe asks."""
        return self.leases.progressing()

    def submit(self, message: RunMessage) -> Future[Outcome]:
        """Run a request; the future resolves once its outcome is committed."""
        if self.holdings is not None:
            self.holdings.add(message.request_id)
        future = self.feed.submit(message)
        future.add_done_callback(partial(self._settled, message.request_id))
        if message.stream and self.relay is not None:
            relay, done = self.relay, [TokenEvent(message.request_id, done=True)]
            future.add_done_callback(lambda _: relay.put(done))  # after the commit
        return future

    def _settled(self, request_id: str, _: Future[Outcome]) -> None:
        self.leases.release(uuid.UUID(request_id))
        if self.holdings is not None:
            self.holdings.discard(request_id)

    def drain(self, deadline: float) -> tuple[int, int]:
        """Take no more work; the engine finishes what it runs until ``deadline`` (monotonic);
        what was held unstarted, and what was cut short then, goes back on the queue now
        (``workers.drain``). Returns how many of each were handed back."""
        unstarted, cut = self.feed.drain(deadline)
        back = partial(hand_back, leases=self.leases, publish=self._publish_runs)
        return back(unstarted, ran=False), back(cut, ran=True)

    def _claim_ahead(self, priority: Priority, ahead: dict[str, int], at: float) -> list[WorkItem]:
        """Tenants' requests claimed ahead of their messages (workers.fairness): no message
        waits on them, so their leases are released here when they finish."""
        items = [WorkItem(m) for m in self.leases.claim_ahead(self.model, priority, ahead, at)]
        for item in items:
            request_id = uuid.UUID(item.message.request_id)
            item.future.add_done_callback(partial(_release, self.leases, request_id))
        return items

    def stop(self) -> None:
        self.feed.stop()
        if self._executor is not None:
            self._executor.stop()
        self.writer.stop()
        self.leases.stop()
        if self.holdings is not None:
            self.holdings.stop()
        if self.relay is not None:
            self.relay.stop()
        self.engine.close()


def _publisher(
    celery: Celery, current: Callable[[], RouterConfig]
) -> Callable[[list[RunMessage]], None]:
    def publish(messages: list[RunMessage]) -> None:
        publish_runs(celery, current(), messages)

    return publish


def _release(leases: Leases, request_id: uuid.UUID, _: Future[Outcome]) -> None:
    leases.release(request_id)


def _sample_succeeded(
    pool: PoolSampler, session: Session, attempts: list[Attempt], outcomes: list[Outcome]
) -> None:
    """Offer the batch's succeeded requests to the evaluation pool, in its transaction."""
    pool.sample(
        session, [a for a, o in zip(attempts, outcomes, strict=True) if o is Outcome.SUCCEEDED]
    )
