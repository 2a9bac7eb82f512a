"""Evaluation tables: the PII-stripped sample pool, its counters, and evaluation runs.

The pool holds copies, never references: a row keeps its (stripped) input and output even
after the request it came from is deleted, so ``request_id`` is not a foreign key.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import Mapped, mapped_column

from core.enums import TaskKind
from storage.tables import Base, _enum, utcnow


class EvalRunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class EvalPoolItem(Base):
    """One sampled request; ``slot`` is its place in its task kind's reservoir."""

    __tablename__ = "eval_pool"
    __table_args__ = (UniqueConstraint("task", "slot", name="uq_eval_pool_task_slot"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task: Mapped[TaskKind] = mapped_column(_enum(TaskKind, "task_kind"))
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    request_id: Mapped[uuid.UUID] = mapped_column(Uuid, index=True)
    input: Mapped[Any] = mapped_column(JSON, nullable=False)
    output: Mapped[Any] = mapped_column(JSON, nullable=False)
    # Replacements made while stripping, per kind: {"email": 1, "phone": 2}.
    pii_counts: Mapped[dict[str, Any]]
    slot: Mapped[int] = mapped_column(Integer)
    # An imported correct answer (``inferq eval import-gold``); runs may score against it.
    gold: Mapped[Any | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EvalCounter(Base):
    """How many sampled requests of a task kind the reservoir has seen (Algorithm R's n)."""

    __tablename__ = "eval_counters"

    task: Mapped[TaskKind] = mapped_column(_enum(TaskKind, "task_kind"), primary_key=True)
    seen: Mapped[int] = mapped_column(BigInteger, default=0)


class EvalRun(Base):
    """A candidate model scored against a reference on the pool of one task kind."""

    __tablename__ = "eval_runs"
    __table_args__ = (Index("ix_eval_runs_task_created", "task", "created_at"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    candidate: Mapped[str] = mapped_column(String(200))
    reference: Mapped[str] = mapped_column(String(200))
    task: Mapped[TaskKind] = mapped_column(_enum(TaskKind, "task_kind"))
    status: Mapped[EvalRunStatus] = mapped_column(
        _enum(EvalRunStatus, "eval_run_status"), default=EvalRunStatus.QUEUED
    )
    scores: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    n: Mapped[int] = mapped_column(Integer, default=0)
    ci_low: Mapped[float | None] = mapped_column(Float)
    ci_high: Mapped[float | None] = mapped_column(Float)
    # The run later runs of its task kind are compared with (``inferq eval baseline``).
    baseline: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    error: Mapped[str | None] = mapped_column(Text)  # why a failed run failed
    jobs: Mapped[dict[str, str] | None] = mapped_column(JSON)  # model -> replay job id
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class EvalRunItem(Base):
    """One pool item as scored by a run; kept when the pool slot is later replaced."""

    __tablename__ = "eval_run_items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("eval_runs.id", ondelete="CASCADE"), index=True
    )
    pool_id: Mapped[int | None] = mapped_column(ForeignKey("eval_pool.id", ondelete="SET NULL"))
    request_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    candidate_output: Mapped[Any | None] = mapped_column(JSON)
    reference_output: Mapped[Any | None] = mapped_column(JSON)
    score: Mapped[float | None] = mapped_column(Float)
