"""The Batch API's JSONL, both ways: input lines to native requests, rows to output lines.

An input line is ``{"custom_id", "method": "POST", "url", "body"}``; ``url`` is the batch's
endpoint (see :mod:`api.openai_endpoints` for what each takes and answers).
Each bad line becomes one error-file line naming its line number (and its ``custom_id`` where
it has one); good lines run. Error-file codes:

* ``invalid_request``: the line was refused before anything ran (not JSON, over the size
  limit, not an object, no or a duplicate ``custom_id``, wrong ``method`` or ``url``, a bad
  ``body``, an unknown model, a prompt too long for the model).
* ``batch_expired``: the line had not started when the completion window closed.
* ``batch_cancelled``: the line had not started when the batch was cancelled.
* ``engine_error``: the line ran and failed (after the worker's retries).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy.orm import Session

from api.jobs import LineError, read_jsonl
from api.jsonl import numbered_lines
from api.line_checks import (
    MAX_ID_CHARS,
    id_problem,
    prepare_each,
    printable,
    unexpected,
    value_problem,
)
from api.openai_endpoints import CHAT_URL, line_request, result_body
from core.enums import RequestStatus
from storage import jobs
from storage.tables import Job, JobError, Request
from submission.prepare import BadRequest, Prepared
from submission.request import CreateRequest
from submission.services import Services

OPENAI = "openai"  # job_sources.format of a Batch API input file
MAX_CUSTOM_ID = MAX_ID_CHARS  # the width of requests.item_id
ERROR_CODES = {
    RequestStatus.EXPIRED: "batch_expired",
    RequestStatus.CANCELLED: "batch_cancelled",
    RequestStatus.FAILED: "engine_error",
}


def endpoint_of(job: Job) -> str:
    """The batch's endpoint, which its job keeps (jobs from before it was kept are chats)."""
    return str((job.shared or {}).get("endpoint", CHAT_URL))


def prepare_lines(
    services: Services, tenant_id: uuid.UUID, data: bytes, *, endpoint: str = CHAT_URL
) -> tuple[list[Prepared], list[LineError]]:
    """Validate every line of an input file; nothing is written here.

    Raises:
        BadRequest: the file has more lines than a job may hold.
    """
    settings = services.settings
    lines = numbered_lines(data)
    if len(lines) > settings.max_job_lines:
        raise BadRequest(f"the input file has more than {settings.max_job_lines} lines")
    parsed = read_jsonl(lines, max_line_bytes=settings.max_line_bytes)
    return check_lines(services, tenant_id, parsed, {}, endpoint=endpoint)


def check_lines(
    services: Services,
    tenant_id: uuid.UUID,
    lines: Iterable[tuple[int, Any]],
    first_seen: dict[str, int],
    *,
    endpoint: str = CHAT_URL,
) -> tuple[list[Prepared], list[LineError]]:
    """Check parsed lines; ``first_seen`` maps custom ids to their first line across chunks."""
    prepared: list[Prepared] = []
    errors: list[LineError] = []
    for number, item in lines:
        if isinstance(item, LineError):
            errors.append(item)
            continue
        custom_id = _custom_id(item)
        try:
            native = _check_line(services, endpoint, item, number, custom_id, first_seen)
            [ready] = prepare_each(services, tenant_id, [native])
            if isinstance(ready, BadRequest):
                raise ready
        except BadRequest as exc:
            errors.append(LineError(number, custom_id, printable(str(exc))))
            continue
        except Exception as exc:  # no line, whatever it holds, stops the others
            errors.append(LineError(number, custom_id, unexpected(exc)))
            continue
        prepared.append(dataclasses.replace(ready, item_id=custom_id, line=number))
    return prepared, errors


def _custom_id(item: Any) -> str | None:
    if not isinstance(item, dict):
        return None
    value = item.get("custom_id")
    if not isinstance(value, str) or not value or id_problem(value) is not None:
        return None
    return value


def _check_line(
    services: Services,
    endpoint: str,
    item: Any,
    number: int,
    custom_id: str | None,
    first_seen: dict[str, int],
) -> CreateRequest:
    if not isinstance(item, dict):
        raise BadRequest("a line must be a JSON object")
    if custom_id is None:
        raise BadRequest(
            f"custom_id must be a non-empty string of at most {MAX_CUSTOM_ID} chars, no NUL"
        )
    if (unstorable := value_problem(item)) is not None:
        raise BadRequest(unstorable)
    if custom_id in first_seen:
        raise BadRequest(
            f"duplicate custom_id {custom_id!r} (first on line {first_seen[custom_id]})"
        )
    first_seen[custom_id] = number
    if item.get("method") != "POST":
        raise BadRequest(f"method {item.get('method')!r} is not supported; use POST")
    if item.get("url") != endpoint:
        raise BadRequest(
            f"url {item.get('url')!r} is not supported in this batch; its endpoint is {endpoint}"
        )
    body = item.get("body")
    if not isinstance(body, dict):
        raise BadRequest(f"body must be a JSON object (a {endpoint} request)")
    return line_request(services, endpoint, body)


def output_line(row: Request, endpoint: str = CHAT_URL) -> dict[str, Any]:
    """A succeeded request as the Batch API writes it to the output file."""
    return {
        "id": f"batch_req_{row.id.hex}",
        "custom_id": row.item_id,
        "response": {
            "status_code": 200,
            "request_id": str(row.id),
            "body": result_body(endpoint, row),
        },
        "error": None,
    }


def request_error_line(row: Request) -> dict[str, Any]:
    """A request that ended without output (expired, cancelled, failed)."""
    message = row.error or f"the request was {row.status.value}"
    return _error_line(f"batch_req_{row.id.hex}", row.item_id, ERROR_CODES[row.status], message)


def line_error_line(job_id: uuid.UUID, error: JobError) -> dict[str, Any]:
    """A line refused at validation; its id is stable across downloads."""
    line_id = uuid.uuid5(job_id, f"line-{error.line}").hex
    message = f"line {error.line}: {error.message}"
    return _error_line(f"batch_req_{line_id}", error.item_id, "invalid_request", message)


def _error_line(line_id: str, custom_id: str | None, code: str, message: str) -> dict[str, Any]:
    return {
        "id": line_id,
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def error_lines(
    job_id: uuid.UUID, refused: list[JobError], requests: Iterator[Request]
) -> Iterator[dict[str, Any]]:
    """Refused lines and requests that ended without output, merged in input order.

    Args:
        job_id: The batch's job, which makes the ids of refused lines.
        refused: The job's refused lines, by line.
        requests: The job's requests, by line; those with output are skipped.
    """
    pending = iter(refused)
    nxt = next(pending, None)
    for row in requests:
        while nxt is not None and nxt.line < (row.line or 0):
            yield line_error_line(job_id, nxt)
            nxt = next(pending, None)
        if row.status in ERROR_CODES:
            yield request_error_line(row)
    while nxt is not None:
        yield line_error_line(job_id, nxt)
        nxt = next(pending, None)


def file_lines(session: Session, job: Job, kind: str) -> Iterator[bytes]:
    """A batch's output (``kind`` ``output``) or error file, a line at a time, in input order."""
    if kind == "output":
        endpoint = endpoint_of(job)
        lines: Iterator[dict[str, Any]] = (
            output_line(row, endpoint)
            for row in jobs.results(session, job.id)
            if row.status is RequestStatus.SUCCEEDED
        )
    else:
        lines = error_lines(job.id, jobs.errors(session, job.id), jobs.results(session, job.id))
    for line in lines:
        yield json.dumps(line, ensure_ascii=False).encode() + b"\n"


MAX_LISTED_ERRORS = 1000


def refusals(errors: list[LineError]) -> dict[str, Any]:
    """Why a batch failed outright, line by line (the first ``MAX_LISTED_ERRORS`` lines)."""
    data: list[dict[str, Any]]
    if not errors:
        data = [{"code": "empty_file", "message": "the input file has no requests"}]
    else:
        data = [
            {"code": "invalid_request", "line": e.line, "message": e.message}
            for e in errors[:MAX_LISTED_ERRORS]
        ]
    return {"lines": len(errors), "data": data}
