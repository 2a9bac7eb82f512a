"""The ledger's four numbers against hand-computed values, on real Postgres.

Exact arithmetic comes from ledger rows written at chosen times in a window of 2020, which no
other test writes into; a real scripted workload (batcher, executor, writer) checks attribution
by token share and that the report agrees with the rows the worker wrote.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.enums import Outcome, Priority, RequestStatus, TaskKind
from core.settings import Settings
from inferq import cli_report
from inferq.cli import main
from inferq.report_data import Section, build_report
from inferq.report_plot import build_figure
from inferq.report_text import money, sig
from router.config import ConfigError, load_config
from storage.ledger_stats import (
    AttemptRow,
    GroupBy,
    GroupStats,
    Spend,
    Window,
    fetch_attempts,
    over_time,
    percentile,
    spend_class,
    summarise,
)
from storage.tables import LedgerEntry, Request, Tenant
from storage.throughput import bucket_seconds, buckets_over, fit_window, throughput_at_p95
from tasks.contract import RunMessage
from tasks.rows import run_message
from tests.conftest import TEST_CONFIG
from workers.engines.scripted import ScriptedEngine
from workers.runtime import WorkerRuntime

T0 = datetime(2020, 1, 1, 10, 0, tzinfo=UTC)
WINDOW = Window(T0, T0 + timedelta(minutes=10))


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@dataclass(frozen=True)
class Run:
    """One attempt to write: its outcome, cost, stage times and when it finished."""

    outcome: Outcome
    cost: float
    finished: float
    queue_wait_s: float = 0.0
    engine_s: float = 0.0
    ttft_s: float | None = None
    client_ttft_s: float | None = None


def write_request(
    session: Session,
    tenant: Tenant,
    *,
    model: str,
    task: TaskKind,
    status: RequestStatus,
    created: float,
    runs: list[Run],
) -> None:
    # The request finished with its first success (later runs are duplicates).
    wins = [r.finished for r in runs if r.outcome is Outcome.SUCCEEDED]
    finished = wins[0] if wins else max(r.finished for r in runs)
    request = Request(
        tenant_id=tenant.id,
        task=task,
        status=status,
        priority=Priority.BATCH,
        model=model,
        input={"prompt": "x"},
        params={},
        created_at=at(created),
        finished_at=at(finished) if status.terminal else None,
    )
    session.add(request)
    session.flush()
    for run in runs:
        session.add(
            LedgerEntry(
                request_id=request.id,
                tenant_id=tenant.id,
                task=task,
                model=model,
                engine="scripted",
                worker="w",
                batch_id=uuid.uuid4(),
                batch_size=1,
                prompt_tokens=10,
                completion_tokens=5,
                queue_wait_s=run.queue_wait_s,
                engine_s=run.engine_s,
                ttft_s=run.ttft_s,
                client_ttft_s=run.client_ttft_s,
                gpu_seconds=run.cost * 3600,  # as if priced 1 per GPU-hour
                cost=run.cost,
                outcome=run.outcome,
                created_at=at(run.finished),
            )
        )


@pytest.fixture(scope="module")
def tenants(sessions: sessionmaker[Session]) -> tuple[str, str]:
    """Model a (chat, tenant one) and model b (extract, tenant two), hand-made ledger rows."""
    ok, failed = Outcome.SUCCEEDED, Outcome.FAILED
    tag = uuid.uuid4().hex[:8]
    with sessions.begin() as session:
        one, two = Tenant(name=f"report-one-{tag}"), Tenant(name=f"report-two-{tag}")
        session.add_all([one, two])
        session.flush()
        a = {"model": "model-a", "task": TaskKind.CHAT}
        done = RequestStatus.SUCCEEDED
        # e2e 2 s; queue waits of model a: 0.5, 1.0, 1.5, 2.0, 2.5, 3.0 in this order.
        write_request(
            session, one, **a, status=done, created=0,
            runs=[Run(ok, 0.10, 2, queue_wait_s=0.5, engine_s=1.0, ttft_s=0.2, client_ttft_s=0.7)],
        )  # fmt: skip
        # Failed, then succeeded: the failed attempt is "retried" waste. e2e 6 s.
        write_request(
            session, one, **a, status=done, created=58,
            runs=[
                Run(failed, 0.05, 60, queue_wait_s=1.0, engine_s=1.0),
                Run(ok, 0.10, 64, queue_wait_s=1.5, engine_s=2.0, ttft_s=0.4, client_ttft_s=1.9),
            ],
        )  # fmt: skip
        # Failed for good: "failed" waste.
        write_request(
            session, one, **a, status=RequestStatus.FAILED, created=90,
            runs=[Run(failed, 0.05, 91, queue_wait_s=2.0, engine_s=1.0)],
        )  # fmt: skip
        # Succeeded (e2e 4 s) and ran once more elsewhere: "duplicate" waste.
        write_request(
            session, one, **a, status=done, created=120,
            runs=[
                Run(ok, 0.10, 124, queue_wait_s=2.5, engine_s=3.0, ttft_s=0.6, client_ttft_s=3.1),
                Run(Outcome.DUPLICATE, 0.10, 125, queue_wait_s=3.0, engine_s=3.0),
            ],
        )  # fmt: skip
        b = {"model": "model-b", "task": TaskKind.EXTRACT}
        write_request(session, two, **b, status=done, created=180, runs=[Run(ok, 0.20, 188)])
        write_request(
            session, two, **b, status=RequestStatus.CANCELLED, created=200,
            runs=[Run(Outcome.CANCELLED, 0.02, 201)],
        )  # fmt: skip
        write_request(
            session, two, **b, status=RequestStatus.FAILED, created=300,
            runs=[Run(Outcome.TIMED_OUT, 0.08, 330)],
        )  # fmt: skip
        # Outside the half-open window: before it, and exactly at its end.
        write_request(session, two, **b, status=done, created=-10, runs=[Run(ok, 1.0, -1)])
        write_request(session, two, **b, status=done, created=590, runs=[Run(ok, 1.0, 600)])
    return one.name, two.name


def report(sessions: sessionmaker[Session], by: GroupBy) -> tuple[list[GroupStats], GroupStats]:
    with sessions() as session:
        rows = fetch_attempts(session, WINDOW)
    return summarise(rows, WINDOW, by)


def test_spend_classes_partition_outcomes() -> None:
    assert spend_class(Outcome.FAILED, RequestStatus.SUCCEEDED) is Spend.RETRIED
    assert spend_class(Outcome.FAILED, RequestStatus.FAILED) is Spend.FAILED
    assert spend_class(Outcome.FAILED, RequestStatus.QUEUED) is Spend.FAILED
    assert spend_class(Outcome.SUCCEEDED, RequestStatus.SUCCEEDED) is Spend.SUCCEEDED
    for outcome in (Outcome.DUPLICATE, Outcome.TIMED_OUT, Outcome.CANCELLED):
        assert spend_class(outcome, RequestStatus.SUCCEEDED).value == outcome.value


def test_cost_per_success_and_waste_by_model(
    sessions: sessionmaker[Session], tenants: tuple[str, str]
) -> None:
    groups, total = report(sessions, GroupBy.MODEL)
    a, b = groups
    assert (a.key, b.key) == ("model-a", "model-b")
    # Model a: six attempts costing 0.10+0.05+0.10+0.05+0.10+0.10 for three successes.
    assert (a.attempts, a.successes) == (6, 3)
    assert a.cost == pytest.approx(0.50)
    assert a.cost_per_success == pytest.approx(0.50 / 3)
    assert a.count_by_spend == {
        Spend.SUCCEEDED: 3,
        Spend.FAILED: 1,
        Spend.RETRIED: 1,
        Spend.TIMED_OUT: 0,
        Spend.DUPLICATE: 1,
        Spend.CANCELLED: 0,
    }
    assert a.share(Spend.RETRIED) == pytest.approx(0.1)
    assert a.share(Spend.FAILED) == pytest.approx(0.1)
    assert a.share(Spend.DUPLICATE) == pytest.approx(0.2)
    assert a.waste_share == pytest.approx(0.4)
    # Model b: 0.20 useful, 0.02 cancelled, 0.08 timed out; the rows outside are left out.
    assert (b.attempts, b.successes, b.cost) == (3, 1, pytest.approx(0.30))
    assert b.cost_per_success == pytest.approx(0.30)
    assert b.share(Spend.CANCELLED) == pytest.approx(0.02 / 0.30)
    assert b.share(Spend.TIMED_OUT) == pytest.approx(0.08 / 0.30)
    assert b.waste_share == pytest.approx(0.10 / 0.30)
    for g in (a, b, total):  # the useful share and the waste shares add up
        assert sum(g.share(s) for s in Spend) == pytest.approx(1.0)
    assert total.cost_per_success == pytest.approx(0.80 / 4)
    assert total.waste_share == pytest.approx(0.30 / 0.80)
    assert total.prompt_tokens == 9 * 10 and total.completion_tokens == 9 * 5
    assert total.gpu_seconds == pytest.approx(0.80 * 3600)


def test_latency_percentiles_and_throughput(
    sessions: sessionmaker[Session], tenants: tuple[str, str]
) -> None:
    (a, b), total = report(sessions, GroupBy.MODEL)
    # End to end, successes only: a has 2, 6, 4 s; b has 8 s. Nearest rank of [2, 4, 6, 8]:
    # p50 is the 2nd value, p95 and p99 the 4th.
    assert (total.end_to_end.p50, total.end_to_end.p95, total.end_to_end.p99) == (4.0, 8.0, 8.0)
    assert (a.end_to_end.p50, a.end_to_end.p95, a.end_to_end.count) == (4.0, 6.0, 3)
    assert (a.queue_wait.p50, a.queue_wait.p95, a.queue_wait.p99) == (1.5, 3.0, 3.0)
    assert (a.engine.p50, a.engine.p95) == (1.0, 3.0)  # 1, 1, 1, 2, 3, 3
    assert (a.ttft.p50, a.ttft.p99, a.ttft.count) == (0.4, 0.6, 3)
    # The client's time to first token (commit to first token out of the worker), queue
    # included: 0.7, 1.9, 3.1 s, beside the engine's 0.2, 0.4, 0.6 s. Model b has none.
    assert (a.client_ttft.p50, a.client_ttft.p95, a.client_ttft.count) == (1.9, 3.1, 3)
    assert b.client_ttft.count == 0 and total.client_ttft.p99 == 3.1
    # The cancelled attempt never ran: no queue or engine time of its own.
    assert b.queue_wait.count == 2
    # Throughput at P95 latency: successes over the 600 s window, next to p95 of 8 s.
    assert total.window_s == 600.0
    assert total.throughput == pytest.approx(4 / 600)
    assert b.throughput == pytest.approx(1 / 600)


def test_grouped_by_task_and_tenant(
    sessions: sessionmaker[Session], tenants: tuple[str, str]
) -> None:
    by_task, _ = report(sessions, GroupBy.TASK)
    assert [(g.key, g.successes, round(g.cost, 9)) for g in by_task] == [
        ("chat", 3, 0.5),
        ("extract", 1, 0.3),
    ]
    one, two = tenants
    by_tenant, _ = report(sessions, GroupBy.TENANT)
    assert [(g.key, g.attempts) for g in by_tenant] == [(one, 6), (two, 3)]


def test_over_time_buckets_split_the_window(
    sessions: sessionmaker[Session], tenants: tuple[str, str]
) -> None:
    with sessions() as session:
        rows = fetch_attempts(session, WINDOW)
    buckets = over_time(rows, WINDOW, buckets=5)  # 120 s each
    assert [b.key for b in buckets] == [at(120 * i).isoformat() for i in range(5)]
    assert [b.attempts for b in buckets] == [4, 4, 1, 0, 0]
    assert [b.successes for b in buckets] == [2, 2, 0, 0, 0]
    assert buckets[0].cost_per_success == pytest.approx(0.30 / 2)
    assert buckets[1].cost_per_success == pytest.approx((0.10 + 0.10 + 0.20 + 0.02) / 2)
    assert buckets[2].cost_per_success is None
    assert sum(b.cost for b in buckets) == pytest.approx(0.80)


def ok_row(finished: float, end_to_end_s: float) -> AttemptRow:
    """A successful attempt finishing ``finished`` seconds after T0."""
    return AttemptRow(
        model="m", task="chat", tenant="t", spend=Spend.SUCCEEDED, cost=0.001, gpu_seconds=1.0,
        prompt_tokens=10, completion_tokens=5, queue_wait_s=0.0, engine_s=0.5, ttft_s=None,
        client_ttft_s=None, at=at(finished), end_to_end_s=end_to_end_s,
    )  # fmt: skip


def test_bucket_length_follows_the_span() -> None:
    assert bucket_seconds(328, max_buckets=30) == 15.0  # 10.9 s wanted: the next round one
    assert bucket_seconds(600, max_buckets=30) == 30.0  # 20 s wanted exactly fits 30
    assert bucket_seconds(600, max_buckets=5) == 120.0
    assert bucket_seconds(86_400, max_buckets=30) == 3600.0
    assert bucket_seconds(0, max_buckets=30) == 5.0  # never shorter
    assert bucket_seconds(400 * 86_400, max_buckets=30) == 2 * 604_800.0


def test_throughput_at_p95_is_the_best_bucket_rate_within_the_target() -> None:
    # 10 s buckets from T0: 2 successes (p95 1 s), 4 (p95 3 s), 6 (p95 12 s: over the target),
    # then 3 (p95 2 s) in a last bucket that runs past the data.
    e2e = [[1, 0.5], [3, 1, 2, 2], [12, 1, 1, 1, 1, 1], [2, 2, 1]]
    rows = [ok_row(10 * b + 1 + i, s) for b, values in enumerate(e2e) for i, s in enumerate(values)]
    window = fit_window(rows, WINDOW)
    assert (window.since, window.until) == (at(1), at(33))  # first to last row
    buckets = buckets_over(rows, window, bucket_s=10)
    assert [b.key for b in buckets] == [at(1 + 10 * i).isoformat() for i in range(4)]
    assert [b.successes for b in buckets] == [2, 4, 6, 3]
    assert [b.throughput for b in buckets] == [0.2, 0.4, 0.6, 0.3]
    assert [b.end_to_end.p95 for b in buckets] == [1, 3, 12, 2]
    best = throughput_at_p95(buckets, target_s=10)
    assert (best.rate, best.p95_s, best.start, best.peak_rate) == (0.4, 3, at(11).isoformat(), 0.6)
    assert throughput_at_p95(buckets, target_s=20).rate == 0.6
    none = throughput_at_p95(buckets, target_s=0.5)
    assert (none.rate, none.p95_s, none.start, none.peak_rate) == (None, None, None, 0.6)
    assert fit_window([], WINDOW) == WINDOW


def test_money_has_significant_digits_and_currency() -> None:
    assert money(0.0000412345, "USD") == "$0.0000412"
    assert money(0.5, "USD") == "$0.500"
    assert money(1234.5, "EUR") == "€1,234.50"
    assert money(-0.00110, "USD") == "-$0.00110"
    assert money(0.00512, "CHF") == "0.00512 CHF"
    assert money(0, "USD") == "$0" and money(None, "USD") == "-"
    assert sig(0.028) == "0.0280" and sig(2.333) == "2.33" and sig(1500) == "1,500"


def test_compare_to_is_checked_when_the_config_loads(tmp_path: Path) -> None:
    config = tmp_path / "models.yaml"
    config.write_text(TEST_CONFIG.read_text() + COMPARE.replace("20000", "-1"))
    with pytest.raises(ConfigError, match=r"compare_to\.price_per_million_input_tokens"):
        load_config(config)
    config.write_text(TEST_CONFIG.read_text() + COMPARE + "  model: gpt\n")
    with pytest.raises(ConfigError, match=r"compare_to\.model: Extra inputs"):
        load_config(config)
    config.write_text(TEST_CONFIG.read_text() + "currency: dollars\n")
    with pytest.raises(ConfigError, match="currency"):
        load_config(config)
    assert load_config(TEST_CONFIG).compare_to is None
    assert load_config(TEST_CONFIG).currency == "USD"


def test_plot_axis_spans_the_data(
    sessions: sessionmaker[Session], tenants: tuple[str, str]
) -> None:
    import matplotlib.dates as mdates

    with sessions() as session:
        rows = fetch_attempts(session, WINDOW)
    data = build_report(rows, WINDOW, GroupBy.MODEL, p95_target_s=10.0)
    figure = build_figure(data)
    throughput, latency, _, cost, by_model = figure.axes
    # 22 buckets of 15 s from the first row (10:00:02): the axis ends with the last bucket.
    left, right = (mdates.num2date(x) for x in cost.get_xlim())
    assert (left, right) == (at(2), at(2 + 22 * 15))
    assert latency.get_xlim() == cost.get_xlim() == throughput.get_xlim()
    assert len(throughput.patches) == 22  # one bar per bucket
    labels = {line.get_label() for line in latency.lines}
    assert {"queue wait p95", "engine p95", "end to end p95"} <= labels
    assert [t.get_text() for t in by_model.get_xticklabels()] == ["model-a", "model-b"]
    # Asked not to fit, the axis runs over the whole requested window.
    whole = build_figure(build_report(rows, WINDOW, GroupBy.MODEL, fit=False, p95_target_s=10.0))
    assert [mdates.num2date(x) for x in whole.axes[0].get_xlim()] == [at(0), at(600)]


def cli_env(settings: Settings) -> dict[str, str]:
    return {
        "INFERQ_DATABASE_URL": settings.database_url,
        "INFERQ_BROKER_URL": settings.broker_url,
        "INFERQ_CONFIG": str(settings.config),
    }


# The same successful work on a hosted model at 20,000 / 40,000 per million tokens: each of the
# four successes in the window used 10 prompt and 5 completion tokens, so 0.4 per success.
COMPARE = """
compare_to:
  name: hosted-big
  price_per_million_input_tokens: 20000
  price_per_million_output_tokens: 40000
"""


def test_report_cli_prints_tables_json_and_plot(
    settings: Settings, tenants: tuple[str, str], tmp_path: Path
) -> None:
    window = ["--since", "2020-01-01T10:00:00", "--until", "2020-01-01T10:10:00"]
    config = tmp_path / "models.yaml"
    config.write_text(TEST_CONFIG.read_text() + COMPARE)
    env = {**cli_env(settings), "INFERQ_CONFIG": str(config)}
    plot = tmp_path / "report.png"
    runner = CliRunner()
    result = runner.invoke(
        main, ["report", *window, "--by", "tenant", "--plot", str(plot)], env=env
    )
    assert result.exit_code == 0, result.output
    one, two = tenants
    lines = result.output.splitlines()
    # The window fits the data: first ledger row at 10:00:02, last at 10:05:30.
    assert lines[0] == "ledger 2020-01-01 10:00:02 .. 10:05:30 UTC (328 s), by tenant; 9 attempts"
    assert lines[1].startswith("window fitted to the data (first to last ledger row)")
    assert "2020-01-01 10:00:00 .. 2020-01-01 10:10:00 (600 s)" in lines[1]
    # 328 s in at most 30 buckets: 15 s each; each success has a bucket of its own (1/15 ok/s).
    assert lines[2].startswith("throughput at P95: 0.0667 ok/s with p95 end to end 2.00 s <= 10 s")
    assert "Throughput per 15 s bucket, next to its p95 end to end (* within 10 s)" in lines
    first_bucket = lines[lines.index("Throughput per 15 s bucket, next to its p95 end to end "
                                     "(* within 10 s)") + 2]  # fmt: skip
    assert first_bucket.split() == ["10:00:02", "1", "1", "0.0667", "2.000", "*"]
    # Costs with their currency and 3 significant digits; tenant one has 3 successes of 6
    # attempts costing 0.5, and would have cost 1.2 on the hosted model.
    assert "Cost per successful inference (USD)" in lines
    cost_row = next(line for line in lines if line.startswith(one) and "$0.500" in line)
    assert cost_row.split()[1:3] == ["3", "6"]
    assert cost_row.split()[-4:] == ["$0.167", "$0.400", "$1.20", "$0.700"]
    total_cost = next(line for line in lines if line.startswith("all") and "$0.800" in line)
    assert total_cost.split()[-4:] == ["$0.200", "$0.400", "$1.60", "$0.800"]
    # The latency table: the client's time to first token beside the engine's.
    engine_ttft = next(line for line in lines if line.startswith(one) and " ttft " in line)
    client_ttft = next(line for line in lines if line.startswith(one) and "ttft (client)" in line)
    assert engine_ttft.split()[-4:] == ["3", "0.400", "0.600", "0.600"]
    assert client_ttft.split()[-4:] == ["3", "1.900", "3.100", "3.100"]
    waste_row = next(line for line in lines if line.startswith(two) and "%" in line)
    assert "66.7% (1)" in waste_row and waste_row.endswith("33.3%")
    # The plot: a real PNG with something drawn on it.
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.stat().st_size > 20_000

    result = runner.invoke(main, ["report", *window, "--json"], env=env)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    # Keys added, none renamed: the fitted window, the buckets, the headline and the comparison.
    assert (data["since"], data["window_s"]) == ("2020-01-01T10:00:02+00:00", 328.0)
    assert data["requested_since"] == "2020-01-01T10:00:00+00:00" and data["window_fitted"]
    assert (data["currency"], data["bucket_s"], data["p95_target_s"]) == ("USD", 15.0, 10.0)
    assert len(data["buckets"]) == 22
    assert [b["successes"] for b in data["buckets"]].count(1) == 4
    assert data["total"]["throughput_at_p95"] == {
        "target_s": 10.0,
        "bucket_s": 15.0,
        "rate": pytest.approx(1 / 15),
        "p95_s": 2.0,
        "start": "2020-01-01T10:00:02+00:00",
        "peak_rate": pytest.approx(1 / 15),
    }
    assert data["total"]["throughput"] == pytest.approx(4 / 328)
    a, b = data["groups"]
    assert a["compare"] == {
        "name": "hosted-big",
        "cost": pytest.approx(1.2),
        "cost_per_success": pytest.approx(0.4),
        "saved": pytest.approx(0.7),
    }
    assert b["compare"]["saved"] == pytest.approx(0.4 - 0.3)
    assert (a["ok_prompt_tokens"], a["ok_completion_tokens"]) == (30, 15)
    assert data["total"]["compare"]["saved"] == pytest.approx(0.8)
    assert data["compare_to"]["price_per_million_output_tokens"] == 40000
    assert [g["key"] for g in data["groups"]] == ["model-a", "model-b"]
    assert data["total"]["cost_per_success"] == pytest.approx(0.2)
    assert data["total"]["share_by_spend"]["duplicate"] == pytest.approx(0.125)
    assert data["total"]["end_to_end"]["p95"] == 8.0
    assert data["total"]["ttft"]["p50"] == 0.4  # the engine's figure, keyed as before
    assert data["total"]["client_ttft"] == {"count": 3, "p50": 1.9, "p95": 3.1, "p99": 3.1}


def test_report_sections_add_a_table_and_a_json_key(
    settings: Settings, tenants: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where spend against budget plugs in: a section sees the session and the figures.
    spend = Section(
        key="spend",
        collect=lambda session, data: {"all": data.total.cost},
        render=lambda value, data: f"Spend\nall {money(value['all'], data.currency)}",
    )
    monkeypatch.setattr(cli_report, "SECTIONS", (spend,))
    window = ["--since", "2020-01-01T10:00:00", "--until", "2020-01-01T10:10:00"]
    runner = CliRunner()
    result = runner.invoke(main, ["report", *window], env=cli_env(settings))
    assert result.exit_code == 0, result.output
    assert result.output.rstrip().endswith("Spend\nall $0.800")
    result = runner.invoke(main, ["report", *window, "--json"], env=cli_env(settings))
    assert json.loads(result.output)["sections"] == {"spend": {"all": pytest.approx(0.8)}}


def test_report_cli_refuses_a_backwards_window(settings: Settings) -> None:
    result = CliRunner().invoke(
        main, ["report", "--since", "1h", "--until", "2h"], env=cli_env(settings)
    )
    assert result.exit_code != 0 and "--since must be before --until" in result.output


# A real workload: the batcher, executor and writer with the scripted engine of tests/config.yaml.


@pytest.fixture
def scripted_runtime(make_runtime: Callable[..., WorkerRuntime]) -> WorkerRuntime:
    config = load_config(TEST_CONFIG)
    engine = ScriptedEngine.from_options(config.models["scripted"].options)
    return make_runtime(engine, config=config, model="scripted", worker_name="report-test")


def enqueue(session: Session, tenant: Tenant, text: str) -> RunMessage:
    row = Request(
        tenant_id=tenant.id,
        task=TaskKind.CHAT,
        status=RequestStatus.QUEUED,
        priority=Priority.BATCH,
        model="scripted",
        input={"messages": [{"role": "user", "content": text}]},
        params={"max_tokens": 32},
    )
    session.add(row)
    session.flush()
    return run_message(row)


def test_scripted_workload_attribution_and_report(
    sessions: sessionmaker[Session], scripted_runtime: WorkerRuntime
) -> None:
    texts = ["one", "two words", "three words here", "POISON pill", "a b c d e f g"]
    since = datetime.now(UTC) - timedelta(seconds=1)
    with sessions.begin() as session:
        tenant = Tenant(name=f"report-live-{uuid.uuid4().hex[:8]}")
        session.add(tenant)
        session.flush()
        messages = [enqueue(session, tenant, text) for text in texts]
        tenant_name = tenant.name
    futures = [scripted_runtime.submit(m) for m in messages]
    outcomes = [f.result(timeout=120) for f in futures]
    assert outcomes == [Outcome.SUCCEEDED] * 3 + [Outcome.FAILED] + [Outcome.SUCCEEDED]
    with sessions() as session:
        ids = [uuid.UUID(m.request_id) for m in messages]
        entries = session.scalars(select(LedgerEntry).where(LedgerEntry.request_id.in_(ids)))
        ledger = {r.request_id: r for r in entries}
        requests = {r.id: r for r in session.scalars(select(Request).where(Request.id.in_(ids)))}
    rows = [ledger[i] for i in ids]
    # The scripted engine counts a prompt as its words + 1 and echoes "echo" + the words.
    for row, text in zip(rows, texts, strict=True):
        if "POISON" in text:  # no tokens, but its failed call's engine time is charged
            assert (row.prompt_tokens, row.completion_tokens) == (0, 0)
            assert 0 < row.gpu_seconds < row.engine_s
        else:
            words = len(text.split())
            assert (row.prompt_tokens, row.completion_tokens) == (words + 1, words + 1)
    by_batch: dict[uuid.UUID, list[LedgerEntry]] = {}
    for row in rows:
        by_batch.setdefault(row.batch_id, []).append(row)
    for batch in by_batch.values():
        # The batch's engine time (1 GPU) is all attributed: failed calls to their requests,
        # the rest by token share.
        assert sum(r.gpu_seconds for r in batch) == pytest.approx(batch[0].engine_s)
        ok = [r for r in batch if r.outcome is Outcome.SUCCEEDED]
        tokens = sum(r.prompt_tokens + r.completion_tokens for r in ok)
        shared = sum(r.gpu_seconds for r in ok)
        for r in batch:
            if r in ok:
                share = (r.prompt_tokens + r.completion_tokens) / tokens
                assert r.gpu_seconds == pytest.approx(shared * share)
            assert r.cost == pytest.approx(r.gpu_seconds * 1.0 / 3600)  # 1.0 per GPU-hour

    window = Window(since, datetime.now(UTC) + timedelta(seconds=1))
    with sessions() as session:
        groups, _ = summarise(fetch_attempts(session, window), window, GroupBy.TENANT)
    [mine] = [g for g in groups if g.key == tenant_name]
    assert (mine.attempts, mine.successes) == (5, 4)
    assert mine.count_by_spend[Spend.FAILED] == 1
    assert mine.cost == pytest.approx(sum(r.cost for r in rows))
    assert mine.cost_per_success == pytest.approx(sum(r.cost for r in rows) / 4)
    e2e = sorted(
        (r.finished_at - r.created_at).total_seconds()
        for r in requests.values()
        if r.status is RequestStatus.SUCCEEDED
    )
    assert mine.end_to_end.p50 == pytest.approx(percentile(e2e, 50))
    assert mine.end_to_end.p95 == pytest.approx(e2e[-1])
