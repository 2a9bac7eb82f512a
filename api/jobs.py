"""Bulk jobs: many items of one task kind with shared parameters, validated line by line.

A line is a JSON object: ``{"id": ..., "input": {...}}``, or flat, its fields named as the
task kind's input (``{"id": "p1", "text": "..."}``; other fields are ignored). The job's
shared ``input`` (a schema, labels) is merged under each item's own. Bad lines are reported
with their line number and the rest runs; ``strict`` refuses the whole job instead, and a job
with no valid line is refused. Nothing is written unless the job is accepted.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from api.schemas import CreateRequest
from api.service import (
    BadRequest,
    Prepared,
    Services,
    check_webhook_url,
    prepare_many,
    submit_job,
)
from inferq.enums import Priority, TaskKind
from storage.models import Job, JobError
from tasks.templates import INPUT_MODELS, SamplingIn

MAX_REPORTED_ERRORS = 20


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: TaskKind
    input: dict[str, Any] = Field(default_factory=dict, description="Shared by every item.")
    params: SamplingIn = Field(default_factory=SamplingIn)
    model: str | None = None
    strict: bool = False
    webhook_url: str | None = Field(default=None, max_length=2000)


class JobBody(JobSpec):
    """The JSON form of ``POST /v1/jobs``: the spec plus the items as a list."""

    items: list[Any]


@dataclasses.dataclass(frozen=True, slots=True)
class LineError:
    line: int
    item_id: str | None
    message: str


def read_jsonl(data: bytes, *, max_line_bytes: int) -> Iterator[tuple[int, Any]]:
    """Number the non-blank lines of a JSONL upload; a line that is not JSON becomes an error."""
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        if len(raw) > max_line_bytes:
            yield (
                number,
                LineError(number, None, f"line is {len(raw)} bytes; the limit is {max_line_bytes}"),
            )
            continue
        try:
            yield number, json.loads(raw)
        except ValueError as exc:
            yield number, LineError(number, None, f"not valid JSON: {exc}")


def create_job(
    services: Services, tenant_id: uuid.UUID, spec: JobSpec, lines: Iterable[tuple[int, Any]]
) -> tuple[Job, list[LineError]]:
    """Validate every line, then write the job, its requests and its errors in one commit."""
    if spec.webhook_url is not None:
        check_webhook_url(services.settings, spec.webhook_url)
    prepared, errors = _prepare_lines(services, tenant_id, spec, lines)
    if errors and (spec.strict or not prepared):
        listed = "; ".join(f"line {e.line}: {e.message}" for e in errors[:MAX_REPORTED_ERRORS])
        why = "strict job refused" if spec.strict else "no valid line"
        raise BadRequest(f"{why}: {len(errors)} bad line(s): {listed}")
    if not prepared:
        raise BadRequest("the job has no items")
    job = Job(
        id=uuid.uuid4(),
        tenant_id=tenant_id,
        task=spec.task,
        model=spec.model,
        shared={"input": spec.input, "params": spec.params.model_dump(exclude_none=True)},
        total=len(prepared),
        invalid=len(errors),
        webhook_url=spec.webhook_url,
    )
    rows = [
        JobError(job_id=job.id, line=e.line, item_id=e.item_id, message=e.message) for e in errors
    ]
    submit_job(services, prepared, job=job, extra=rows)
    return job, errors


def _prepare_lines(
    services: Services, tenant_id: uuid.UUID, spec: JobSpec, lines: Iterable[tuple[int, Any]]
) -> tuple[list[Prepared], list[LineError]]:
    fields = {f.alias or name for name, f in INPUT_MODELS[spec.task].model_fields.items()}
    limit = services.settings.max_job_lines
    prepared: list[Prepared] = []
    errors: list[LineError] = []
    first_seen: dict[str, int] = {}
    staged: list[tuple[int, str | None, CreateRequest]] = []
    for number, item in lines:
        if len(staged) + len(errors) >= limit:
            raise BadRequest(f"the job has more than {limit} lines")
        if isinstance(item, LineError):
            errors.append(item)
            continue
        problem, item_id = _check_item(item, number, first_seen)
        if problem is not None:
            errors.append(LineError(number, item_id, problem))
            continue
        own = item["input"] if "input" in item else {k: v for k, v in item.items() if k in fields}
        body = CreateRequest.model_construct(
            task=spec.task,
            input={**spec.input, **own},
            params=spec.params,
            model=spec.model,
            priority=Priority.BATCH,
            idempotency_key=None,
            webhook_url=None,
        )
        staged.append((number, item_id, body))
    checked = prepare_many(services, tenant_id, [body for _, _, body in staged])
    for (number, item_id, _body), result in zip(staged, checked, strict=True):
        if isinstance(result, BadRequest):
            errors.append(LineError(number, item_id, str(result)))
        else:
            prepared.append(dataclasses.replace(result, item_id=item_id, line=number))
    errors.sort(key=lambda e: e.line)
    return prepared, errors


def _check_item(
    item: Any, number: int, first_seen: dict[str, int]
) -> tuple[str | None, str | None]:
    if not isinstance(item, dict):
        return "a line must be a JSON object", None
    item_id = str(item.get("id", item.get("custom_id", number)))
    if item_id in first_seen:
        return f"duplicate id {item_id!r} (first on line {first_seen[item_id]})", item_id
    first_seen[item_id] = number
    if "input" in item and not isinstance(item["input"], dict):
        return "input must be a JSON object", item_id
    return None, item_id
