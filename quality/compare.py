"""Comparing evaluation runs: latest against previous and baseline, and the regression flag.

Each succeeded run has one headline value per task kind (``scores["value"]``, see
:func:`quality.scoring.score_task`) with a 95 % interval ``[ci_low, ci_high]``.

Runs compare with the run before them and the baseline of the same task kind and reference.
A run *regresses* against one of them when both hold:

1. the drop ``earlier.value - run.value`` exceeds the threshold (``INFERQ_EVAL_THRESHOLD``,
   0.02 by default), and
2. the earlier value lies above the run's own interval (``ci_high < earlier.value``): a drop
   the run's sampling noise alone could explain is not flagged.

So a small pool needs a larger drop before it is flagged, and a large one a smaller drop; a
model compared with itself (same outputs) never is. The same rule serves ``inferq eval
report``, the webhook sent after a run and the ``inferq_eval_regression`` gauge.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.enums import TaskKind
from core.settings import Settings
from storage.eval_tables import EvalRun, EvalRunStatus


@dataclass(frozen=True, slots=True)
class RunSummary:
    id: str
    candidate: str
    reference: str
    metric: str
    value: float
    ci_low: float
    ci_high: float
    n: int
    created_at: str
    baseline: bool

    @classmethod
    def of(cls, run: EvalRun) -> RunSummary:
        scores = run.scores or {}
        return cls(
            id=str(run.id),
            candidate=run.candidate,
            reference=run.reference,
            metric=str(scores.get("metric", "")),
            value=float(scores.get("value", 0.0)),
            ci_low=run.ci_low or 0.0,
            ci_high=run.ci_high or 0.0,
            n=run.n,
            created_at=run.created_at.isoformat(),
            baseline=run.baseline,
        )

    def describe(self) -> str:
        mark = " [baseline]" if self.baseline else ""
        return (
            f"{self.candidate} vs {self.reference}: {self.metric} {self.value:.3f} "
            f"[{self.ci_low:.3f}, {self.ci_high:.3f}] n={self.n} ({self.id[:8]}{mark})"
        )


def regressed(run: RunSummary, earlier: RunSummary | None, *, threshold: float) -> bool:
    """The rule in the module docstring."""
    if earlier is None or earlier.id == run.id:
        return False
    return earlier.value - run.value > threshold and run.ci_high < earlier.value


@dataclass(frozen=True, slots=True)
class Comparison:
    task: TaskKind
    latest: RunSummary
    previous: RunSummary | None
    baseline: RunSummary | None
    threshold: float

    @property
    def against_previous(self) -> bool:
        return regressed(self.latest, self.previous, threshold=self.threshold)

    @property
    def against_baseline(self) -> bool:
        return regressed(self.latest, self.baseline, threshold=self.threshold)

    @property
    def regression(self) -> bool:
        return self.against_previous or self.against_baseline

    def lines(self) -> list[str]:
        """What ``inferq eval report`` prints for the task kind."""
        out = [f"{self.task.value}: latest {self.latest.describe()}"]
        for name, earlier, flagged in (
            ("previous", self.previous, self.against_previous),
            ("baseline", self.baseline, self.against_baseline),
        ):
            if earlier is None or earlier.id == self.latest.id:
                out.append(f"  vs {name}: none")
                continue
            delta = self.latest.value - earlier.value
            out.append(f"  vs {name} {earlier.describe()}: {delta:+.3f}")
            if flagged:
                out.append(
                    f"  REGRESSION {self.task.value} {self.latest.candidate}: {-delta:.3f} "
                    f"below the {name} (threshold {self.threshold:.3f}, outside the run's interval)"
                )
        return out

    def as_event(self) -> dict[str, Any]:
        """The ``eval.regression`` webhook's data."""
        return {
            "task": self.task.value,
            "threshold": self.threshold,
            "latest": _plain(self.latest),
            "previous": _plain(self.previous),
            "baseline": _plain(self.baseline),
            "against_previous": self.against_previous,
            "against_baseline": self.against_baseline,
        }


def _plain(summary: RunSummary | None) -> dict[str, Any] | None:
    if summary is None:
        return None
    return {name: getattr(summary, name) for name in RunSummary.__slots__}


def _succeeded(task: TaskKind) -> Any:
    return select(EvalRun).where(EvalRun.task == task, EvalRun.status == EvalRunStatus.SUCCEEDED)


def compare_run(session: Session, run: EvalRun, *, threshold: float) -> Comparison:
    """``run`` against the run before it and the baseline, of its task kind and reference.

    Only runs scored against the same reference compare: agreement with another model is
    not accuracy against gold.
    """
    same = _succeeded(run.task).where(EvalRun.reference == run.reference)
    previous = session.scalar(
        same.where(EvalRun.created_at <= run.created_at, EvalRun.id != run.id)
        .order_by(EvalRun.created_at.desc())
        .limit(1)
    )
    baseline = session.scalar(same.where(EvalRun.baseline.is_(True)).limit(1))
    return Comparison(
        task=run.task,
        latest=RunSummary.of(run),
        previous=RunSummary.of(previous) if previous is not None else None,
        baseline=RunSummary.of(baseline) if baseline is not None else None,
        threshold=threshold,
    )


def latest_comparisons(
    session: Session, *, threshold: float, task: TaskKind | None = None
) -> list[Comparison]:
    """Per task kind (or just ``task``), its latest succeeded run compared."""
    comparisons = []
    for kind in [task] if task is not None else list(TaskKind):
        latest = session.scalar(_succeeded(kind).order_by(EvalRun.created_at.desc()).limit(1))
        if latest is not None:
            comparisons.append(compare_run(session, latest, threshold=threshold))
    return comparisons


def regression_flags(session: Session, *, threshold: float) -> dict[tuple[str, str], bool]:
    """(task, candidate) -> whether that candidate's latest run regressed."""
    latest: dict[tuple[str, str], EvalRun] = {}
    runs = session.scalars(
        select(EvalRun)
        .where(EvalRun.status == EvalRunStatus.SUCCEEDED)
        .order_by(EvalRun.created_at)
    )
    for run in runs:
        latest[(run.task.value, run.candidate)] = run
    return {
        key: compare_run(session, run, threshold=threshold).regression
        for key, run in latest.items()
    }


class HasSessions(Protocol):
    """What the collector needs of the API's services (``submission.submit.Services`` fits)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def sessions(self) -> sessionmaker[Session]: ...


class RegressionCollector(Collector):
    """``inferq_eval_regression{task,candidate}``: 1 while that candidate's latest run regressed.

    Read from Postgres at scrape time, at most every ``ttl_s`` seconds.
    """

    def __init__(self, services: Callable[[], HasSessions], *, ttl_s: float) -> None:
        self._services = services
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._taken = -float("inf")
        self._flags: dict[tuple[str, str], bool] = {}

    def flags(self) -> dict[tuple[str, str], bool]:
        with self._lock:
            if time.monotonic() - self._taken >= self._ttl_s:
                services = self._services()
                threshold = services.settings.eval_threshold
                with services.sessions() as session:
                    self._flags = regression_flags(session, threshold=threshold)
                self._taken = time.monotonic()
            return self._flags

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "inferq_eval_regression",
            "1 if the candidate's latest evaluation run regressed against the previous run "
            "or the baseline of its task kind.",
            labels=["task", "candidate"],
        )
        for (task, candidate), flagged in sorted(self.flags().items()):
            family.add_metric([task, candidate], 1.0 if flagged else 0.0)
        yield family
