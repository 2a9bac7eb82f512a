"""Bulk jobs: many items of one task kind with shared parameters, validated line by line.

A line is a JSON object: ``{"id": ..., "input": {...}}``, or flat, its fields named as the
task kind's input (``{"id": "p1", "text": "..."}``; other fields are ignored). The job's
shared ``input`` (a schema, labels) is merged under each item's own. Bad lines are reported
with their line number and the rest runs; ``strict`` refuses the whole job instead, and a job
with no valid line is refused (or, for a large upload checked in the background, fails).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.jsonl import chunks_of, count_lines, numbered_lines
from api.line_checks import (
    MAX_DEPTH,
    id_problem,
    prepare_each,
    printable,
    unexpected,
    value_problem,
)
from core.enums import JobStatus, Priority, TaskKind
from storage.tables import Job, JobError, JobSource
from submission.prepare import BadRequest, Prepared, check_webhook_url
from submission.request import CreateRequest
from submission.services import Services
from submission.submit import submit_job
from tasks.templates import INPUT_MODELS, SamplingIn, json_text

MAX_REPORTED_ERRORS = 20
NATIVE = "native"  # job_sources.format of a native upload


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: TaskKind
    input: dict[str, Any] = Field(default_factory=dict, description="Shared by every item.")
    params: SamplingIn = Field(default_factory=SamplingIn)
    model: str | None = None
    strict: bool = False
    webhook_url: str | None = Field(default=None, max_length=2000)

    @field_validator("input")
    @classmethod
    def _storable(cls, shared: dict[str, Any]) -> dict[str, Any]:
        json_text(shared)  # a large upload's job row keeps it before any line is checked
        return shared


class JobBody(JobSpec):
    """The JSON form of ``POST /v1/jobs``: the spec plus the items as a list."""

    items: list[Any]


@dataclasses.dataclass(frozen=True, slots=True)
class LineError:
    line: int
    item_id: str | None
    message: str


def parse_line(number: int, raw: bytes, *, max_line_bytes: int) -> Any:
    """One line's JSON value, or the :class:`LineError` that refuses it."""
    if len(raw) > max_line_bytes:
        return LineError(number, None, f"line is {len(raw)} bytes; the limit is {max_line_bytes}")
    try:
        return json.loads(raw)
    except ValueError as exc:
        return LineError(number, None, printable(f"not valid JSON: {exc}"))
    except RecursionError:
        return LineError(number, None, f"nested more than {MAX_DEPTH} levels deep")


def read_jsonl(
    lines: Iterable[tuple[int, bytes]], *, max_line_bytes: int
) -> Iterator[tuple[int, Any]]:
    """Parse numbered lines; a line that is not JSON or is too long becomes a LineError."""
    for number, raw in lines:
        yield number, parse_line(number, raw, max_line_bytes=max_line_bytes)


def as_jsonl(items: list[Any]) -> bytes:
    """A JSON list of items as JSONL, so both upload forms are stored and numbered alike."""
    return b"".join(json.dumps(item, ensure_ascii=False).encode() + b"\n" for item in items)


def create_job(
    services: Services, tenant_id: uuid.UUID, spec: JobSpec, data: bytes
) -> tuple[Job, list[LineError]]:
    """Accept a job's JSONL upload.

    Up to ``settings.inline_job_lines`` lines are validated now: the job, its requests and its
    refused lines are written in one commit (a strict refusal writes nothing). A longer upload
    is stored as it is and admitted in the background (``api.admission``), its job
    ``validating`` until every line is checked.
    """
    settings = services.settings
    if spec.webhook_url is not None:
        check_webhook_url(settings, spec.webhook_url)
    if (spec.params.max_tokens or 0) > settings.max_output_tokens:  # else every line fails
        raise BadRequest(f"params.max_tokens must be between 1 and {settings.max_output_tokens}")
    count = count_lines(chunks_of(data), limit=settings.max_job_lines)
    if not count:
        raise BadRequest("the job has no items")
    job = Job(
        id=uuid.uuid4(),
        tenant_id=tenant_id,
        task=spec.task,
        model=spec.model,
        shared={"input": spec.input, "params": spec.params.stored()},
        webhook_url=spec.webhook_url,
    )
    if count > settings.inline_job_lines:
        job.status = JobStatus.VALIDATING
        source = JobSource(job_id=job.id, content=data, format=NATIVE, strict=spec.strict)
        with services.sessions.begin() as session:
            session.add(job)
            session.flush()
            session.add(source)
        return job, []
    parsed = read_jsonl(numbered_lines(data), max_line_bytes=settings.max_line_bytes)
    prepared, errors = check_lines(services, tenant_id, spec, parsed, {})
    if errors and (spec.strict or not prepared):
        listed = "; ".join(f"line {e.line}: {e.message}" for e in errors[:MAX_REPORTED_ERRORS])
        why = "strict job refused" if spec.strict else "no valid line"
        raise BadRequest(f"{why}: {len(errors)} bad line(s): {listed}")
    if services.limits is not None:
        services.limits.admit(prepared)
    job.total, job.invalid = len(prepared), len(errors)
    rows = [
        JobError(job_id=job.id, line=e.line, item_id=e.item_id, message=e.message) for e in errors
    ]
    submit_job(services, prepared, job=job, extra=rows)
    return job, errors


def spec_of(job: Job, *, strict: bool) -> JobSpec:
    """The spec a job was submitted with, from what its row keeps."""
    shared = job.shared or {}
    return JobSpec(
        task=job.task,
        input=shared.get("input", {}),
        params=SamplingIn.model_validate(shared.get("params", {})),
        model=job.model,
        strict=strict,
        webhook_url=job.webhook_url,
    )


def check_lines(
    services: Services,
    tenant_id: uuid.UUID,
    spec: JobSpec,
    lines: Iterable[tuple[int, Any]],
    first_seen: dict[str, int],
) -> tuple[list[Prepared], list[LineError]]:
    """Check parsed lines; ``first_seen`` maps item ids to their first line across chunks."""
    fields = {f.alias or name for name, f in INPUT_MODELS[spec.task].model_fields.items()}
    prepared: list[Prepared] = []
    errors: list[LineError] = []
    staged: list[tuple[int, str | None, CreateRequest]] = []
    for number, item in lines:
        if isinstance(item, LineError):
            errors.append(item)
            continue
        try:
            problem, item_id = _check_item(item, number, first_seen)
        except Exception as exc:  # no line, whatever it holds, stops the others
            problem, item_id = unexpected(exc), None
        if problem is not None:
            errors.append(LineError(number, item_id, printable(problem)))
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
    checked = prepare_each(services, tenant_id, [body for _, _, body in staged])
    for (number, item_id, _body), result in zip(staged, checked, strict=True):
        if isinstance(result, BadRequest):
            errors.append(LineError(number, item_id, printable(str(result))))
        else:
            prepared.append(dataclasses.replace(result, item_id=item_id, line=number))
    errors.sort(key=lambda e: e.line)
    return prepared, errors


def _check_item(
    item: Any, number: int, first_seen: dict[str, int]
) -> tuple[str | None, str | None]:
    if not isinstance(item, dict):
        return "a line must be a JSON object", None
    raw_id = item.get("id", item.get("custom_id", number))
    if isinstance(raw_id, str) and (bad_id := id_problem(raw_id)) is not None:
        return bad_id, None
    if (unstorable := value_problem(item)) is not None:
        return unstorable, None
    item_id = str(raw_id)
    if (bad_id := id_problem(item_id)) is not None:
        return bad_id, None
    if item_id in first_seen:
        return f"duplicate id {item_id!r} (first on line {first_seen[item_id]})", item_id
    first_seen[item_id] = number
    if "input" in item and not isinstance(item["input"], dict):
        return "input must be a JSON object", item_id
    return None, item_id
