"""The reconciler's scan on a big queue: its time and its plans with many queued rows.

Fills a throwaway Postgres database (``INFERQ_BENCH_DATABASE_URL``, migrated to head) with
``--rows`` queued requests whose leases are fresh (nine in ten on one model, the rest on a
second; one in ten with a deadline tomorrow), plus ``--lapsed`` of each kind the reconciler
must take (queued and never published, queued past its lease, running past its lease) and
``--lapsed`` queued past their deadline. Then it times ``--rounds`` reconciler passes (expire
the overdue, take the lapsed: ``storage.reconcile``), each rolled back so every round sees
the same rows, and prints the ``EXPLAIN (ANALYZE, BUFFERS)`` plan of each of the pass's
statements. The last line printed is one JSON object.

    python -m bench.reconcile_scan [--rows 1000000] [--lapsed 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from datetime import timedelta

from sqlalchemy import ClauseElement, Connection, text
from sqlalchemy.orm import Session

from core.settings import Settings
from maintenance.reconciler import BATCH_LIMIT
from storage import reconcile
from storage.db import make_engine, make_sessionmaker
from storage.migrate import scratch_database
from storage.tables import utcnow
from storage.tenants import create_tenant

ADMIN_URL = os.environ.get("INFERQ_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
MODELS = ("tiny", "small")
QUEUED_LEASE = timedelta(seconds=Settings.model_fields["queued_lease_s"].default)
RUNNING_LEASE = timedelta(seconds=Settings.model_fields["running_lease_s"].default)

# Fresh queued rows: leases renewed within the last minute, one in ten with a deadline tomorrow.
_FILL = """
INSERT INTO requests (id, tenant_id, task, status, priority, model, input, params, attempts,
                      deliveries, created_at, published_at, deadline_at)
SELECT gen_random_uuid(), :tenant, 'complete', 'queued', 'batch',
       CASE WHEN g % 10 = 0 THEN :second ELSE :first END,
       '{"prompt": "hello"}', '{"max_tokens": 16}', 0, 0,
       now() - make_interval(secs => g / 1000.0),
       now() - make_interval(secs => (g % 60000) / 1000.0),
       CASE WHEN g % 10 = 1 THEN now() + interval '1 day' END
FROM generate_series(1, :rows) AS g
"""
# What a pass must find: (status, published_at, deadline_at) of each kind.
_LAPSES = (
    ("queued", "NULL", "NULL"),
    ("queued", "now() - interval '1 hour'", "NULL"),
    ("running", "now() - interval '1 hour'", "NULL"),
    ("queued", "now()", "now() - interval '1 minute'"),
)


def main() -> None:
    args = _parse()
    with scratch_database(ADMIN_URL, "inferq_bench") as url:
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        with sessions.begin() as session:
            tenant = create_tenant(session, f"bench-{uuid.uuid4().hex[:8]}")[0].id
        started = time.perf_counter()
        with engine.begin() as conn:
            _fill(conn, tenant, args.rows, args.lapsed)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE requests"))
        fill_s = time.perf_counter() - started
        passes = []
        for _ in range(args.rounds):
            with sessions() as session:
                passes.append(_one_pass(session))
                session.rollback()
        plans = {}
        with sessions() as session:
            now = utcnow()
            for model in MODELS:
                queries = reconcile.lapsed_queries(
                    now, model=model, queued_lease=QUEUED_LEASE, running_lease=RUNNING_LEASE
                )
                for kind, query in zip(("unpublished", "queued", "running"), queries, strict=True):
                    statement = query.limit(BATCH_LIMIT).with_for_update(skip_locked=True)
                    plans[f"lapsed {kind} {model}"] = _explain(session, statement)
            plans["overdue"] = _explain(session, reconcile.overdue_update(now))
            session.rollback()
        engine.dispose()
    for name, plan in plans.items():
        print(f"-- {name}\n{plan}\n")
    taken = {p[1] for p in passes}
    print(
        json.dumps(
            {
                "queued_rows": args.rows,
                "fill_s": round(fill_s, 1),
                "pass_ms_median": round(statistics.median(p[0] for p in passes) * 1000, 1),
                "pass_ms": [round(p[0] * 1000, 1) for p in passes],
                "taken_per_pass": sorted(taken),
                "expected_per_pass": 4 * args.lapsed,
                "sequential_scans": sum("Seq Scan" in plan for plan in plans.values()),
            }
        )
    )


def _fill(conn: Connection, tenant: uuid.UUID, rows: int, lapsed: int) -> None:
    conn.execute(
        text(_FILL), {"tenant": tenant, "rows": rows, "first": MODELS[0], "second": MODELS[1]}
    )
    for status, published, deadline in _LAPSES:
        conn.execute(
            text(
                _FILL.replace("'queued', 'batch'", f"'{status}', 'batch'")
                .replace("now() - make_interval(secs => (g % 60000) / 1000.0)", published)
                .replace("CASE WHEN g % 10 = 1 THEN now() + interval '1 day' END", deadline)
            ),
            {"tenant": tenant, "rows": lapsed, "first": MODELS[0], "second": MODELS[1]},
        )


def _one_pass(session: Session) -> tuple[float, int]:
    """What a reconciler pass asks of Postgres: seconds, and requests expired plus taken."""
    now = utcnow()
    started = time.perf_counter()
    expired = session.execute(reconcile.overdue_update(now)).all()
    taken = reconcile.take_lost(
        session,
        now,
        queued_lease=QUEUED_LEASE,
        running_lease=RUNNING_LEASE,
        models=MODELS,
        limit=BATCH_LIMIT,
    )
    elapsed = time.perf_counter() - started
    return elapsed, len(taken) + len(expired)


def _explain(session: Session, statement: ClauseElement) -> str:
    compiled = statement.compile(
        dialect=session.get_bind().dialect, compile_kwargs={"render_postcompile": True}
    )
    rows = session.connection().exec_driver_sql(
        f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {compiled}", dict(compiled.params)
    )
    return "\n".join(row[0] for row in rows)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="fresh queued requests")
    parser.add_argument("--lapsed", type=int, default=100, help="rows of each kind to take")
    parser.add_argument("--rounds", type=int, default=5)
    return parser.parse_args()


if __name__ == "__main__":
    main()
