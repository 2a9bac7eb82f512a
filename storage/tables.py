"""Table models. The same schema runs on Postgres (service mode) and SQLite (embedded)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.enums import JobStatus, Outcome, Priority, RequestStatus, TaskKind

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """Stored times are UTC; SQLite hands them back naive."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _enum(kind: type[Any], name: str) -> Enum:
    # Stored as plain strings with a CHECK, so SQLite and Postgres read the same.
    return Enum(
        kind,
        name=name,
        native_enum=False,
        length=16,
        values_callable=lambda e: [m.value for m in e],
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TenantBudget(Base):
    """A tenant's spending limits, in the ledger's currency (None: no limit for that period).
    Periods are UTC calendar days and months."""

    __tablename__ = "tenant_budgets"

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    daily: Mapped[float | None] = mapped_column(Float)
    monthly: Mapped[float | None] = mapped_column(Float)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    # SHA-256 of a 256-bit random key: the key itself is shown once and never stored.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # A public identifier (``iq_`` and 12 random hex): no character of the secret.
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Set by ``inferq tenant key revoke``; a revoked key is refused once caches expire.
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Job(Base):
    """A bulk job: many requests of one task kind submitted together."""

    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    task: Mapped[TaskKind] = mapped_column(_enum(TaskKind, "task_kind"))
    status: Mapped[JobStatus] = mapped_column(
        _enum(JobStatus, "job_status"), default=JobStatus.IN_PROGRESS
    )
    model: Mapped[str | None] = mapped_column(String(200))
    # What every item shares (a schema, labels, sampling), so lines carry only their text.
    shared: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    total: Mapped[int] = mapped_column(Integer, default=0)
    invalid: Mapped[int] = mapped_column(Integer, default=0)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deadline_at: Mapped[datetime | None]
    cancelled_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class JobError(Base):
    """A line of a job's input that was refused, with why; the rest of the job runs."""

    __tablename__ = "job_errors"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    line: Mapped[int] = mapped_column(Integer)
    item_id: Mapped[str | None] = mapped_column(String(200))
    message: Mapped[str] = mapped_column(Text)


class Request(Base):
    __tablename__ = "requests"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_requests_tenant_idempotency"),
        # The reconciler's scans (storage.reconcile): lapsed leases of a status and model, and
        # queued requests past a deadline (few requests have one, so only those are indexed).
        Index("ix_requests_lease", "status", "model", "published_at"),
        Index(
            "ix_requests_deadline",
            "status",
            "deadline_at",
            postgresql_where=text("deadline_at IS NOT NULL"),
            sqlite_where=text("deadline_at IS NOT NULL"),
        ),
        # Fair claims: the tenants waiting on a model, each one's oldest first (storage.requests).
        Index("ix_requests_fair_order", "status", "model", "priority", "tenant_id", "created_at"),
        # A job's requests, and whether any is still open (storage.events, api.admission).
        Index("ix_requests_job_status", "job_id", "status"),
        # ``inferq canary status``: a route's requests over a window (few rows are on a canary).
        Index(
            "ix_requests_canary",
            "canary_route",
            "created_at",
            postgresql_where=text("canary_route IS NOT NULL"),
            sqlite_where=text("canary_route IS NOT NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    # Looked up by tenant through uq_requests_tenant_idempotency (tenant_id first), by job
    # through ix_requests_job_status.
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    task: Mapped[TaskKind] = mapped_column(_enum(TaskKind, "task_kind"))
    status: Mapped[RequestStatus] = mapped_column(_enum(RequestStatus, "request_status"))
    priority: Mapped[Priority] = mapped_column(_enum(Priority, "priority"))
    model: Mapped[str] = mapped_column(String(200))
    input: Mapped[dict[str, Any]]
    params: Mapped[dict[str, Any]]
    output: Mapped[Any | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # Within a job: the caller's id for the item and its line, for results in input order.
    item_id: Mapped[str | None] = mapped_column(String(200))
    line: Mapped[int | None] = mapped_column(Integer)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    first_token_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    deadline_at: Mapped[datetime | None]
    # When the message was last handed to the broker; the reconciler re-publishes past a lease.
    published_at: Mapped[datetime | None]
    # Times a worker claimed it; past the cap the request fails instead of running again.
    deliveries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The models still to try, in order, and why the request left the one it was routed to.
    fallbacks: Mapped[list[str] | None] = mapped_column(JSON)
    fallback_reason: Mapped[str | None] = mapped_column(Text)
    # The most it may cost, reserved against its tenant's budget while it is open (storage.budgets).
    reserved_cost: Mapped[float | None] = mapped_column(Float)
    first_model: Mapped[str | None] = mapped_column(String(200))
    # The worker that last claimed it (``model@host:pid``): who holds it while it runs.
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    # Routed by a canary route: its name and the arm taken (``control`` or ``candidate``).
    canary_route: Mapped[str | None] = mapped_column(String(100))
    canary_arm: Mapped[str | None] = mapped_column(String(16))


class JobSource(Base):
    """A job's uploaded lines, kept until every line is validated and admitted.

    ``cursor`` counts the lines already turned into requests or errors, so admission resumes
    where it stopped after a restart.
    """

    __tablename__ = "job_sources"

    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    content: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)  # read in slices
    format: Mapped[str] = mapped_column(String(8))
    strict: Mapped[bool] = mapped_column(Boolean)
    cursor: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class LedgerEntry(Base):
    """One row per attempt: what it cost and what came of it."""

    __tablename__ = "ledger"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("requests.id", ondelete="CASCADE"), index=True
    )
    tenant_id: Mapped[uuid.UUID] = mapped_column(Uuid, index=True)
    task: Mapped[TaskKind] = mapped_column(_enum(TaskKind, "task_kind"))
    model: Mapped[str] = mapped_column(String(200))
    engine: Mapped[str] = mapped_column(String(32))
    worker: Mapped[str] = mapped_column(String(200))
    batch_id: Mapped[uuid.UUID] = mapped_column(Uuid, index=True)
    batch_size: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    queue_wait_s: Mapped[float] = mapped_column(Float)
    engine_s: Mapped[float] = mapped_column(Float)
    ttft_s: Mapped[float | None] = mapped_column(Float)  # the engine's own figure
    # From the request's commit to its first token leaving the worker: what the client waits.
    client_ttft_s: Mapped[float | None] = mapped_column(Float)
    gpu_seconds: Mapped[float] = mapped_column(Float)
    cost: Mapped[float] = mapped_column(Float)
    outcome: Mapped[Outcome] = mapped_column(_enum(Outcome, "outcome"))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
