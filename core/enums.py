"""The closed vocabularies shared by the API, the router, the tasks and the workers."""

from __future__ import annotations

from enum import StrEnum


class TaskKind(StrEnum):
    EXTRACT = "extract"
    EXPAND = "expand"
    CLASSIFY = "classify"
    CHAT = "chat"
    COMPLETE = "complete"
    EMBED = "embed"  # one vector for a text, from a pooling model


class Priority(StrEnum):
    INTERACTIVE = "interactive"
    BATCH = "batch"


class RequestStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self not in OPEN_STATUSES


class JobStatus(StrEnum):
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"


# Not yet finished: what a worker may still claim, and what cancelling or expiring touches.
OPEN_STATUSES = (RequestStatus.QUEUED, RequestStatus.RUNNING)


class Outcome(StrEnum):
    """What one attempt (one ledger row) came to."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    DUPLICATE = "duplicate"
    CANCELLED = "cancelled"
