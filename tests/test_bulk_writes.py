"""The bulk path's set-based writes on real Postgres store exactly what the row-at-a-time
statements they replaced stored: ``COPY`` rows (storage.bulk), the one-statement result
update and the claim that expires or claims in one statement (storage.ledger)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from core.enums import Outcome, Priority, RequestStatus, TaskKind
from storage.bulk import insert_rows
from storage.ledger import Attempt, claim, record_batch
from storage.reconcile import DEADLINE_PASSED
from storage.tables import LedgerEntry, Request


def _row(tenant_id: uuid.UUID, line: int, **columns: object) -> dict[str, object]:
    now = datetime.now(UTC)
    return {
        "id": uuid.uuid4(),
        "tenant_id": tenant_id,
        "item_id": f"item {line}",
        "line": line,
        "task": TaskKind.CHAT,
        "status": RequestStatus.QUEUED,
        "priority": Priority.BATCH,
        "model": "m",
        "input": {"messages": [{"role": "user", "content": 'tab\t, newline\n, "\\" é \u2028'}]},
        "params": {"max_tokens": 8, "stop": None},
        "fallbacks": None,  # a JSON column given None: JSON null, as the INSERT stores it
        "deadline_at": None,
        "created_at": now,
        "queued_at": now,
        "published_at": now,
        **columns,
    }


def test_copied_rows_are_stored_as_the_insert_stores_them(
    sessions: sessionmaker[Session], tenant_id: uuid.UUID
) -> None:
    inserted, copied = _row(tenant_id, 1), _row(tenant_id, 2)  # attempts left to its default
    with sessions.begin() as session:
        session.execute(insert(Request.__table__), [inserted])
        insert_rows(session, Request.__table__, [copied])
    skip = {"id", "item_id", "line", "created_at", "queued_at", "published_at"}
    columns = [c for c in Request.__table__.c.keys() if c not in skip]
    shown = ", ".join(f"{c}::text AS {c}" for c in columns)
    with sessions() as session:
        stored = [
            session.execute(text(f"SELECT {shown} FROM requests WHERE id = :id"), {"id": r["id"]})
            .one()
            ._asdict()
            for r in (inserted, copied)
        ]
    assert stored[0] == stored[1]
    assert stored[1]["attempts"] == "0" and stored[1]["fallbacks"] == "null"


def _attempt(request_id: uuid.UUID, tenant_id: uuid.UUID, *, ok: bool) -> Attempt:
    now = datetime.now(UTC)
    return Attempt(
        request_id=request_id,
        tenant_id=tenant_id,
        task=TaskKind.CHAT,
        model="m",
        engine="scripted",
        worker="w",
        batch_id=uuid.uuid4(),
        batch_size=3,
        succeeded=ok,
        output={"text": "out", "n": [1, None]} if ok else None,
        error=None if ok else "it broke",
        prompt_tokens=5,
        completion_tokens=2 if ok else 0,
        finish_reason="stop" if ok else None,
        queue_wait_s=0.1,
        engine_s=0.2,
        ttft_s=None,
        gpu_seconds=0.1,
        cost=0.01,
        started_at=now,
        first_token_at=now if ok else None,
        finished_at=now,
    )


def test_claim_and_results_in_one_statement_each(
    sessions: sessionmaker[Session], tenant_id: uuid.UUID
) -> None:
    past = datetime.now(UTC) - timedelta(seconds=1)
    rows = [_row(tenant_id, n) for n in range(3)]
    rows.append(_row(tenant_id, 3, deadline_at=past))  # expires instead of being claimed
    rows.append(_row(tenant_id, 4, status=RequestStatus.CANCELLED))  # not claimable
    ids = [r["id"] for r in rows]
    assert all(isinstance(i, uuid.UUID) for i in ids)
    with sessions.begin() as session:
        insert_rows(session, Request.__table__, rows)
    at = datetime.now(UTC)
    with sessions.begin() as session:
        claimed = claim(
            session, ids, at, running_lease=timedelta(minutes=5), max_deliveries=3, worker="w"
        )
    assert claimed == set(ids[:3])
    attempts = [
        _attempt(ids[0], tenant_id, ok=True),
        _attempt(ids[1], tenant_id, ok=False),
        _attempt(ids[0], tenant_id, ok=True),  # a second copy in the batch: a duplicate
        _attempt(ids[4], tenant_id, ok=True),  # cancelled meanwhile
    ]
    with sessions.begin() as session:
        outcomes = record_batch(session, attempts)
    assert outcomes == [Outcome.SUCCEEDED, Outcome.FAILED, Outcome.DUPLICATE, Outcome.CANCELLED]
    with sessions() as session:
        stored = {r.id: r for r in session.scalars(select(Request).where(Request.id.in_(ids)))}
        ledger = session.scalars(select(LedgerEntry).where(LedgerEntry.request_id.in_(ids)))
        assert sorted(e.outcome for e in ledger) == sorted(outcomes)
    done, failed, waiting, expired, cancelled = (stored[i] for i in ids)
    assert done.status == RequestStatus.SUCCEEDED and done.output == {"text": "out", "n": [1, None]}
    assert (done.completion_tokens, done.finish_reason, done.attempts) == (2, "stop", 1)
    assert done.deliveries == 1 and done.claimed_by == "w" and done.first_token_at is not None
    assert failed.status == RequestStatus.FAILED and failed.error == "it broke"
    assert failed.output is None and failed.first_token_at is None
    assert waiting.status == RequestStatus.RUNNING and waiting.started_at is not None
    assert expired.status == RequestStatus.EXPIRED and expired.error == DEADLINE_PASSED
    assert expired.deliveries == 0 and expired.started_at is None
    assert cancelled.status == RequestStatus.CANCELLED and cancelled.output is None
