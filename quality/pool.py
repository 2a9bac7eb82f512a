"""The evaluation pool: a PII-stripped, bounded sample of succeeded requests per task kind.

Two steps decide whether a succeeded request enters the pool:

1. **Share.** A request is *offered* when its tenant opted in (``eval_tenants``) and
   ``h(request_id) < share`` for its task kind, where ``h`` maps the id's SHA-256 to [0, 1).
   Hashing instead of drawing makes the choice the same on every retry of the same batch.
2. **Reservoir (Algorithm R, per task kind).** ``eval_counters.seen`` counts the offered
   requests of the kind; the k-th one (k = seen after incrementing) goes into slot ``k - 1``
   while k <= N (``eval_window``); after that it replaces slot ``j = rng.randrange(k)`` when
   j < N and is dropped otherwise. Every offered request so far is then in the pool with the
   same probability N / k, so old and new traffic are both represented, and the pool never
   holds more than N rows per kind (``unique (task, slot)`` enforces it).

The counter is incremented with ``INSERT .. ON CONFLICT DO UPDATE .. RETURNING``, which holds
the counter row's lock until the caller commits: concurrent writers of one kind take turns,
so two of them never fill the same slot. Only stripped text is written (see
:mod:`quality.pii`); the raw input and output never reach the pool's tables.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core.enums import TaskKind
from core.settings import Settings
from quality.pii import PiiStripper
from storage.eval_tables import EvalCounter, EvalPoolItem
from storage.tables import Request

ALL_TENANTS = "*"


class Succeeded(Protocol):
    """What the hook needs of a finished attempt (``storage.ledger.Attempt`` fits)."""

    @property
    def request_id(self) -> uuid.UUID: ...
    @property
    def tenant_id(self) -> uuid.UUID: ...
    @property
    def task(self) -> TaskKind: ...
    @property
    def output(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class PoolPolicy:
    """Who and how much is sampled, and how many rows each task kind keeps."""

    share: float = 0.0
    task_shares: Mapping[str, float] = field(default_factory=dict)
    window: int = 1000
    tenants: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: Settings) -> PoolPolicy:
        return cls(
            share=settings.eval_sample_share,
            task_shares=dict(settings.eval_task_shares),
            window=settings.eval_window,
            tenants=frozenset(settings.eval_tenants),
        )

    @property
    def enabled(self) -> bool:
        return bool(self.tenants) and (self.share > 0 or any(self.task_shares.values()))

    def share_for(self, task: TaskKind) -> float:
        return self.task_shares.get(task.value, self.share)

    def offers(self, row: Succeeded) -> bool:
        """True if this request is offered to its kind's reservoir (step 1 above)."""
        if ALL_TENANTS not in self.tenants and str(row.tenant_id) not in self.tenants:
            return False
        return unit_hash(row.request_id) < self.share_for(row.task)


def unit_hash(request_id: uuid.UUID) -> float:
    """A request id mapped uniformly onto [0, 1), the same on every process and retry."""
    digest = hashlib.sha256(request_id.bytes).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def sample_succeeded(
    session: Session,
    rows: Sequence[Succeeded],
    *,
    policy: PoolPolicy,
    stripper: PiiStripper,
    rng: random.Random,
) -> list[int]:
    """Offer a batch's succeeded requests to the pool, inside the caller's transaction.

    Returns:
        The slots written, in the order of the offered rows (for logs and tests).
    """
    if not policy.enabled:
        return []
    offered = [row for row in rows if policy.offers(row)]
    if not offered:
        return []
    ids = [row.request_id for row in offered]
    found = session.execute(select(Request.id, Request.input).where(Request.id.in_(ids)))
    inputs = {request_id: raw for request_id, raw in found}
    written: list[int] = []
    by_task: dict[TaskKind, list[Succeeded]] = {}
    for row in offered:
        by_task.setdefault(TaskKind(row.task), []).append(row)
    for task, task_rows in by_task.items():
        seen = _advance(session, task, len(task_rows))
        first = seen - len(task_rows) + 1
        for k, row in enumerate(task_rows, start=first):
            slot = reservoir_slot(k, policy.window, rng)
            if slot is not None:
                _put(session, task, slot, row, inputs.get(row.request_id), stripper)
                written.append(slot)
    return written


def reservoir_slot(k: int, window: int, rng: random.Random) -> int | None:
    """Algorithm R for the k-th item (1-based): its slot, or None when it is not kept."""
    if k <= window:
        return k - 1
    j = rng.randrange(k)
    return j if j < window else None


def _advance(session: Session, task: TaskKind, count: int) -> int:
    """Add ``count`` to the kind's counter and return the new value, locking the row."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    table = EvalCounter.__table__
    statement = (
        dialect.insert(table)
        .values(task=task.value, seen=count)
        .on_conflict_do_update(index_elements=["task"], set_={"seen": table.c.seen + count})
        .returning(table.c.seen)
    )
    return int(session.execute(statement).scalar_one())


def _put(
    session: Session,
    task: TaskKind,
    slot: int,
    row: Succeeded,
    raw_input: Any,
    stripper: PiiStripper,
) -> None:
    """Fill ``slot`` with a stripped copy; the row it replaces goes (run items keep a null)."""
    stripped_in = stripper.strip(raw_input)
    stripped_out = stripper.strip(row.output)
    counts = stripped_in.counts + stripped_out.counts
    session.execute(
        delete(EvalPoolItem).where(EvalPoolItem.task == task, EvalPoolItem.slot == slot)
    )
    session.add(
        EvalPoolItem(
            task=task,
            tenant_id=row.tenant_id,
            request_id=row.request_id,
            input=stripped_in.value,
            output=stripped_out.value,
            pii_counts=dict(counts),
            slot=slot,
        )
    )
    session.flush()


class PoolSampler:
    """The hook a worker builds once at start-up, holding the stripper and the random source.

    :meth:`from_settings` returns None when sampling is off, so a worker that samples nothing
    never imports Presidio.
    """

    def __init__(self, policy: PoolPolicy, stripper: PiiStripper, rng: random.Random) -> None:
        self.policy = policy
        self._stripper = stripper
        self._rng = rng

    @classmethod
    def from_settings(cls, settings: Settings) -> PoolSampler | None:
        from quality.pii import build_stripper

        policy = PoolPolicy.from_settings(settings)
        if not policy.enabled:
            return None
        return cls(policy, build_stripper(), random.Random())

    def sample(self, session: Session, rows: Sequence[Succeeded]) -> list[int]:
        """Call inside the batch's commit transaction with its succeeded attempts."""
        return sample_succeeded(
            session, rows, policy=self.policy, stripper=self._stripper, rng=self._rng
        )


def add_known(
    session: Session,
    tenant_id: uuid.UUID,
    task: TaskKind,
    items: Sequence[tuple[Any, Any]],
) -> list[EvalPoolItem]:
    """Put (input, correct output) pairs straight into the pool, in the slots after the last.

    For benchmarks and tests that need a pool with known answers and no production traffic;
    the reservoir's counter is left alone, and nothing is stripped.
    """
    last = session.scalar(select(func.max(EvalPoolItem.slot)).where(EvalPoolItem.task == task))
    first = -1 if last is None else last
    rows = [
        EvalPoolItem(
            task=task,
            tenant_id=tenant_id,
            request_id=uuid.uuid4(),
            input=given,
            output=output,
            pii_counts={},
            slot=first + offset,
        )
        for offset, (given, output) in enumerate(items, start=1)
    ]
    session.add_all(rows)
    session.flush()
    return rows
