"""Evaluation runs end to end: the pool replayed through real queues to real `inferq worker`
processes running vLLM on a trained and a degraded tiny model, scored, stored, compared.

The two models come from a short training run cached under the test models folder (trained
on the first run, reused after). The pool holds generated product descriptions whose stored
output is the generator's ground truth, so ``--reference pool`` scores against gold.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from core.enums import Priority, RequestStatus, TaskKind
from core.settings import Settings
from inferq.cli import main
from inferq.training.train import (
    DEGRADED_NAME,
    QUICK,
    SCHEMA_PATH,
    TRAINED_NAME,
    ensure_trained,
    held_out_products,
    products,
)
from quality.compare import RegressionCollector
from quality.pool import add_known
from storage.eval_tables import EvalCounter, EvalPoolItem, EvalRun, EvalRunItem, EvalRunStatus
from storage.tables import Job, Request
from storage.webhooks import WebhookDelivery
from tasks.eval_schedule import EVAL_TASK, beat_schedule, parse_cron
from tasks.queues import FixedQueue
from tests.conftest import (
    MODELS_DIR,
    Process,
    new_tenant,
    service_env,
    start,
    start_workers,
    stop,
    wait_for,
)
from tests.stack import own_settings

TRAINED = TRAINED_NAME
DEGRADED = DEGRADED_NAME
PARKED = "parked"
POOL_SIZE = 60
CLASSIFY_POOL = 6
HOOK = "http://127.0.0.1:9/eval-hook"  # nothing listens; the delivery row is what is checked


@pytest.fixture(scope="module")
def eval_models() -> tuple[Path, Path]:
    return ensure_trained(MODELS_DIR / "eval", QUICK)


@pytest.fixture(scope="module")
def eval_settings(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory, eval_models: tuple[Path, Path]
) -> Settings:
    spec = {"engine": "vllm", "max_model_len": 512, "max_batch_size": 64, "batch_window_ms": 50}
    config: dict[str, Any] = {
        "models": {
            name: {**spec, "path": str(path), "options": {"dtype": "float32"}}
            for name, path in zip((TRAINED, DEGRADED), eval_models, strict=True)
        },
        "routes": [{"task": "*", "model": TRAINED}],
    }
    # No worker serves it: what is sent to it waits on its queue.
    config["models"][PARKED] = {"engine": "scripted", "path": str(eval_models[0])}
    path = tmp_path_factory.mktemp("eval") / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return own_settings(settings, path)


@pytest.fixture(scope="module")
def env(eval_settings: Settings) -> dict[str, str]:
    """The environment of the CLI and the workers: webhook, schedule and its candidates."""
    return {
        **service_env(eval_settings),
        "INFERQ_EVAL_WEBHOOK_URL": HOOK,
        "INFERQ_WEBHOOK_ALLOW_PRIVATE": "true",
        "INFERQ_EVAL_CANDIDATES": json.dumps([TRAINED]),
        "INFERQ_EVAL_TASKS": json.dumps(["classify"]),
        "INFERQ_EVAL_CRON": "* * * * *",  # the test's beat sends it within a minute
        "INFERQ_RECONCILER": "false",
        # Queues of their own: every worker consumes the maintenance queue, and the suite's
        # session workers (other settings, no candidates) would take the beat's tasks.
        "INFERQ_BROKER_KEY_PREFIX": "eval:",
    }


@pytest.fixture
def clean_eval(sessions: sessionmaker[Session]) -> Iterator[None]:
    """Pool and runs are global: each test starts and ends with none."""

    def wipe() -> None:
        with sessions.begin() as session:
            session.execute(delete(EvalRun))
            session.execute(delete(EvalPoolItem))
            session.execute(delete(EvalCounter))

    wipe()
    yield
    wipe()


def fill_pool(sessions: sessionmaker[Session], *, extract: int, classify: int) -> list[int]:
    """Generated products with their correct answers; returns the extract items' pool ids."""
    schema = json.loads(SCHEMA_PATH.read_text())
    held_out = {item["text"] for item in held_out_products()}
    catalogue = products(97, extract + classify, exclude=held_out)
    labels = ["in stock", "sold out"]
    tenant = new_tenant(sessions, "eval")
    with sessions.begin() as session:
        known = [({"text": p["text"], "schema": schema}, p["attributes"]) for p in catalogue]
        rows = add_known(session, tenant.id, TaskKind.EXTRACT, known[:extract])
        guesses = [({"text": p["text"], "labels": labels}, labels[0]) for p in catalogue[extract:]]
        add_known(session, tenant.id, TaskKind.CLASSIFY, guesses)
        return [row.id for row in rows]


def cli(env: dict[str, str], *args: str) -> Result:
    result = CliRunner().invoke(main, ["eval", *args], env=env, catch_exceptions=False)
    print(f"$ inferq eval {' '.join(args)} -> {result.exit_code}\n{result.output}")
    return result


@pytest.fixture
def eval_workers(env: dict[str, str], log_dir: Path) -> Iterator[dict[str, Process]]:
    running = start_workers(env, log_dir, [TRAINED, DEGRADED], tag="eval")
    yield running
    for process in running.values():
        stop(process)


def runs_of(sessions: sessionmaker[Session], task: TaskKind) -> list[EvalRun]:
    with sessions() as session:
        query = select(EvalRun).where(EvalRun.task == task).order_by(EvalRun.created_at)
        return list(session.scalars(query))


def test_degraded_model_is_flagged_and_the_trained_model_against_itself_is_not(
    clean_eval: None,
    env: dict[str, str],
    eval_settings: Settings,
    eval_workers: dict[str, Process],
    sessions: sessionmaker[Session],
    log_dir: Path,
) -> None:
    fill_pool(sessions, extract=POOL_SIZE, classify=CLASSIFY_POOL)
    beat = start("eval-beat", ["eval", "beat"], env, log_dir)
    try:
        first = cli(env, "run", "--candidate", TRAINED, "--baseline")
        assert first.exit_code == 0 and "REGRESSION" not in first.output
        degraded = cli(env, "run", "--candidate", DEGRADED)
        assert degraded.exit_code == 0
        assert f"REGRESSION extract {DEGRADED}" in degraded.output
        report = cli(env, "report", "--task", "extract")
        assert report.exit_code == 1 and f"REGRESSION extract {DEGRADED}" in report.output

        services = _Services(eval_settings, sessions)
        flags = RegressionCollector(lambda: services, ttl_s=0).flags()
        extract = {key: flag for key, flag in flags.items() if key[0] == "extract"}
        assert extract == {("extract", TRAINED): False, ("extract", DEGRADED): True}

        again = cli(env, "run", "--candidate", TRAINED)
        assert again.exit_code == 0 and "REGRESSION" not in again.output
        report = cli(env, "report", "--task", "extract")
        assert report.exit_code == 0 and "REGRESSION" not in report.output
        assert RegressionCollector(lambda: services, ttl_s=0).flags()[("extract", TRAINED)] is False

        # Scored against another model (both replayed at once): compared only with its kind.
        versus = cli(env, "run", "--candidate", TRAINED, "--reference", DEGRADED)
        assert versus.exit_code == 0 and "REGRESSION" not in versus.output

        runs = runs_of(sessions, TaskKind.EXTRACT)
        assert [(r.candidate, r.reference, r.status) for r in runs] == [
            (TRAINED, "pool", EvalRunStatus.SUCCEEDED),
            (DEGRADED, "pool", EvalRunStatus.SUCCEEDED),
            (TRAINED, "pool", EvalRunStatus.SUCCEEDED),
            (TRAINED, DEGRADED, EvalRunStatus.SUCCEEDED),
        ]
        base, worse, same, _versus = runs
        assert base.baseline and not worse.baseline
        value = {r.id: (r.scores or {})["value"] for r in runs}
        print(
            f"field accuracy on {POOL_SIZE} pool items: trained {value[base.id]:.3f} "
            f"[{base.ci_low:.3f}, {base.ci_high:.3f}], degraded {value[worse.id]:.3f} "
            f"[{worse.ci_low:.3f}, {worse.ci_high:.3f}], trained again {value[same.id]:.3f}"
        )
        assert value[base.id] - value[worse.id] > eval_settings.eval_threshold
        assert worse.ci_high is not None and worse.ci_high < value[base.id]
        assert (base.scores or {})["schema_valid"] == 1.0
        assert len(_versus.jobs or {}) == 2

        with sessions() as session:
            for run in runs:
                items = session.scalar(
                    select(func.count())
                    .select_from(EvalRunItem)
                    .where(EvalRunItem.run_id == run.id)
                )
                assert run.n == POOL_SIZE and items == POOL_SIZE
            jobs = session.scalars(select(Job).where(Job.model.in_([TRAINED, DEGRADED])))
            assert all(job.total in (POOL_SIZE, CLASSIFY_POOL) for job in jobs)
            hooks = session.scalars(
                select(WebhookDelivery).where(WebhookDelivery.event_type == "eval.regression")
            ).all()
            replayed = session.scalars(
                select(Request.priority).where(Request.job_id.in_(_job_ids(runs)))
            ).all()
        # Batch priority: interactive requests on the same queues are served first.
        assert len(replayed) == 5 * POOL_SIZE and set(replayed) == {Priority.BATCH}
        flagged = [h.payload["latest"]["id"] for h in hooks]
        assert str(worse.id) in flagged and str(base.id) not in flagged
        assert str(same.id) not in flagged

        # The beat sent the scheduled evaluation; a worker ran it (classify, per its settings).
        def scheduled() -> bool:
            if beat.proc.poll() is not None:
                pytest.fail(f"beat exited:\n{beat.tail()}")
            done = runs_of(sessions, TaskKind.CLASSIFY)
            return any(r.status is EvalRunStatus.SUCCEEDED for r in done)

        wait_for(scheduled, timeout=300, what="the scheduled evaluation run")
        [run, *_] = runs_of(sessions, TaskKind.CLASSIFY)
        assert run.candidate == TRAINED and run.n == CLASSIFY_POOL
    finally:
        stop(beat)


def _job_ids(runs: list[EvalRun]) -> list[uuid.UUID]:
    return [uuid.UUID(job_id) for run in runs for job_id in (run.jobs or {}).values()]


class _Services:
    """What the gauge reads of the API's services."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions


def test_bad_input_is_refused_with_a_clear_message_and_nothing_stored(
    clean_eval: None,
    env: dict[str, str],
    sessions: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    def counts() -> tuple[int, int]:
        with sessions() as session:
            runs = session.scalar(select(func.count()).select_from(EvalRun)) or 0
            jobs = session.scalar(select(func.count()).select_from(Job)) or 0
        return runs, jobs

    before = counts()
    empty = cli(env, "run", "--candidate", TRAINED)
    assert empty.exit_code == 1 and "the evaluation pool has no extract items" in empty.output

    pool_ids = fill_pool(sessions, extract=4, classify=0)
    unknown = cli(env, "run", "--candidate", "nope")
    assert unknown.exit_code == 1
    assert "candidate model 'nope' is not configured" in unknown.output
    no_model = cli(env, "run", "--candidate", TRAINED, "--reference", "missing")
    assert no_model.exit_code == 1 and "reference model 'missing'" in no_model.output
    no_gold = cli(env, "run", "--candidate", TRAINED, "--reference", "gold")
    assert (
        no_gold.exit_code == 1 and "4 of 4 extract pool items have no gold label" in no_gold.output
    )
    metadata = {**env, "INFERQ_EVAL_WEBHOOK_URL": "http://169.254.169.254/latest"}
    unsafe = CliRunner().invoke(main, ["eval", "run", "--candidate", TRAINED], env=metadata)
    assert unsafe.exit_code == 1 and "INFERQ_EVAL_WEBHOOK_URL" in unsafe.output
    assert counts() == before

    gold = tmp_path / "gold.jsonl"
    good = {"pool_id": pool_ids[0], "output": {"brand": "Hjem"}}
    gold.write_text(
        json.dumps(good)
        + "\n"
        + json.dumps({"pool_id": 10**9, "output": {"brand": "x"}})
        + "\n"
        + json.dumps({"pool_id": pool_ids[1], "output": "not an object"})
        + "\n"
    )
    refused = cli(env, "import-gold", str(gold))
    assert refused.exit_code == 1
    assert "line 2: pool_id 1000000000 is not in the evaluation pool" in refused.output
    assert "line 3: output must be a JSON object for task kind extract" in refused.output
    with sessions() as session:
        assert session.scalar(select(func.count()).where(EvalPoolItem.gold.is_not(None))) == 0

    gold.write_text(json.dumps(good) + "\n")
    assert cli(env, "import-gold", str(gold)).exit_code == 0
    with sessions() as session:
        assert session.get(EvalPoolItem, pool_ids[0]).gold == {"brand": "Hjem"}  # type: ignore[union-attr]

    assert cli(env, "baseline", str(uuid.uuid4())).output.startswith("Error: no evaluation run")
    assert "no succeeded evaluation runs" in cli(env, "report").output

    # A replay that does not finish in time is cancelled and stored as failed, with no scores.
    late = cli(env, "run", "--candidate", PARKED, "--timeout", "1")
    assert late.exit_code == 1
    assert "evaluation failed: replay not finished after 1s; cancelled" in late.output
    with sessions() as session:
        [run] = session.scalars(select(EvalRun)).all()
        assert run.status is EvalRunStatus.FAILED and run.scores is None and run.n == 0
        job_id = uuid.UUID((run.jobs or {})[PARKED])
        statuses = session.scalars(select(Request.status).where(Request.job_id == job_id)).all()
        assert statuses and set(statuses) == {RequestStatus.CANCELLED}
        items = session.scalar(select(func.count()).select_from(EvalRunItem))
        assert items == 0
    assert cli(env, "baseline", str(run.id)).output.startswith(f"Error: run {run.id} is failed")


def test_the_schedule_is_weekly_by_default_on_the_maintenance_queue() -> None:
    entry = beat_schedule(Settings(database_url="sqlite://", broker_url="redis://x"))
    spec = entry["inferq-eval"]
    assert spec["task"] == EVAL_TASK
    assert entry["inferq-canary"]["schedule"] == 300.0  # the canary policy, every 5 minutes
    assert spec["options"] == {"queue": FixedQueue.MAINTENANCE.value}
    assert spec["schedule"] == parse_cron("0 3 * * 1")
    with pytest.raises(ValueError, match="INFERQ_EVAL_CRON '0 3 \\* \\*': expected 5 fields"):
        parse_cron("0 3 * *")
    bad = subprocess.run(
        [sys.executable, "-m", "inferq.cli", "eval", "beat"],
        env={
            **service_env(Settings(broker_url="redis://127.0.0.1:1/0")),
            "INFERQ_EVAL_CRON": "0 99 * * *",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "INFERQ_EVAL_CRON '0 99 * * *'" in bad.stderr
