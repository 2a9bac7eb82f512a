"""The reconciler's scans use indexes: they read the rows they take, not every queued lease.

The planner is left to choose (no ``enable_seqscan=off``): beside ten thousand fresh queued
rows, each of the pass's statements must be answered by an index alone, with no row read
and then filtered out. ``bench.reconcile_scan`` shows the same plans and their time on a
million queued rows. Everything here is rolled back.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import ClauseElement, text
from sqlalchemy.orm import Session, sessionmaker

from core.enums import Priority, RequestStatus, TaskKind
from storage import reconcile
from storage.tables import Request, utcnow

FRESH = 10_000
QUEUED_LEASE = timedelta(seconds=120)
RUNNING_LEASE = timedelta(seconds=20)

# Fresh queued rows: leases renewed within the last minute, one in ten with a deadline tomorrow.
_FILL = """
INSERT INTO requests (id, tenant_id, task, status, priority, model, input, params, attempts,
                      deliveries, created_at, published_at, deadline_at)
SELECT gen_random_uuid(), :tenant, 'complete', 'queued', 'batch', :model, '{}', '{}', 0, 0,
       now(), now() - make_interval(secs => g % 60),
       CASE WHEN g % 10 = 0 THEN now() + interval '1 day' END
FROM generate_series(1, :rows) AS g
"""


def test_each_statement_of_a_pass_reads_only_an_index_and_takes_only_the_lapsed(
    sessions: sessionmaker[Session], tenant_id: uuid.UUID
) -> None:
    model = f"scan-{uuid.uuid4().hex[:8]}"  # no worker or reconciler knows it
    now = utcnow()
    ago = now - timedelta(hours=1)
    lapsed = [
        _row(tenant_id, model, published_at=None),
        _row(tenant_id, model, published_at=ago),
        _row(tenant_id, model, status=RequestStatus.RUNNING, published_at=ago),
    ]
    with sessions() as session:
        session.execute(text(_FILL), {"tenant": tenant_id, "model": model, "rows": FRESH})
        session.add_all([*lapsed, _row(tenant_id, model, published_at=now, deadline_at=ago)])
        session.flush()
        session.execute(text("ANALYZE requests"))  # sees this transaction's rows
        queries = reconcile.lapsed_queries(
            now, model=model, queued_lease=QUEUED_LEASE, running_lease=RUNNING_LEASE
        )
        plans = [_plan(session, q.limit(5000).with_for_update(skip_locked=True)) for q in queries]
        for plan in plans:
            assert _reads_only(plan, "ix_requests_lease"), plan
        overdue = _plan(session, reconcile.overdue_update(now))
        assert _reads_only(overdue, "ix_requests_deadline"), overdue

        taken = reconcile.take_lost(
            session,
            now,
            queued_lease=QUEUED_LEASE,
            running_lease=RUNNING_LEASE,
            models=[model],
            limit=5000,
        )
        assert {r.id for r in taken} == {r.id for r in lapsed}
        assert {(r.status, r.published_at) for r in taken} == {(RequestStatus.QUEUED, now)}
        session.rollback()


def _row(tenant_id: uuid.UUID, model: str, **values: object) -> Request:
    fields: dict[str, object] = {
        "tenant_id": tenant_id,
        "task": TaskKind.COMPLETE,
        "status": RequestStatus.QUEUED,
        "priority": Priority.BATCH,
        "model": model,
        "input": {"prompt": "lapsed"},
        "params": {"max_tokens": 4},
        **values,
    }
    return Request(**fields)


def _plan(session: Session, statement: ClauseElement) -> str:
    """The plan Postgres chooses for ``statement`` with its parameters (not executed)."""
    compiled = statement.compile(
        dialect=session.get_bind().dialect, compile_kwargs={"render_postcompile": True}
    )
    rows = session.connection().exec_driver_sql(f"EXPLAIN {compiled}", dict(compiled.params))
    return "\n".join(row[0] for row in rows)


def _reads_only(plan: str, index: str) -> bool:
    """The plan finds its rows through ``index`` (a plain or a bitmap index scan, the
    planner's choice by the table's other rows) and reads no row it then throws away."""
    through = f"Index Scan using {index}" in plan or f"Bitmap Index Scan on {index}" in plan
    return through and "Seq Scan" not in plan and "Filter:" not in plan
