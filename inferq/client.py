"""The Python client for inferq's native API: one contract whatever engine answers.

``generate`` (or ``submit`` then ``wait``) gives a :class:`Result` with the text, token usage,
latency and the model that answered, the same shape for vLLM, transformers, a hosted API or
the scripted engine, and whether or not the request fell back along its route. The job
methods serve the CLI's bulk commands.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

_TERMINAL = frozenset({"succeeded", "failed", "expired", "cancelled"})
_MAX_POLL_S = 30.0  # the API's bound on one long poll


class ApiError(RuntimeError):
    """The API refused a call; the message is the API's own."""


class RequestFailed(RuntimeError):
    """A request ended without a result (failed, expired or cancelled)."""

    def __init__(self, result: Result) -> None:
        super().__init__(f"request {result.id} {result.status}: {result.error}")
        self.result = result


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class Latency:
    queue_s: float | None
    ttft_s: float | None
    total_s: float | None


@dataclass(frozen=True, slots=True)
class Result:
    """A request as the API reports it.

    ``text`` is the output as text: a string output as it is (a chat reply, a label), other
    outputs (an extracted object, expanded variants) as JSON.
    """

    id: str
    status: str
    task: str
    model: str
    output: Any
    error: str | None
    usage: Usage | None
    latency: Latency
    first_model: str | None = None
    fallback_reason: str | None = None

    @property
    def text(self) -> str | None:
        if self.output is None:
            return None
        return self.output if isinstance(self.output, str) else json.dumps(self.output)

    @property
    def done(self) -> bool:
        return self.status in _TERMINAL

    @classmethod
    def of(cls, body: dict[str, Any]) -> Result:
        usage, latency = body.get("usage"), body["latency"]
        return cls(
            id=str(body["id"]),
            status=str(body["status"]),
            task=str(body["task"]),
            model=str(body["model"]),
            output=body.get("output"),
            error=body.get("error"),
            usage=Usage(
                prompt_tokens=usage["prompt_tokens"],
                completion_tokens=usage["completion_tokens"],
                total_tokens=usage["total_tokens"],
            )
            if usage
            else None,
            latency=Latency(
                queue_s=latency.get("queue_s"),
                ttft_s=latency.get("ttft_s"),
                total_s=latency.get("total_s"),
            ),
            first_model=body.get("first_model"),
            fallback_reason=body.get("fallback_reason"),
        )


class Client:
    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = 300.0) -> None:
        if not api_key:
            raise ApiError("no API key: set INFERQ_API_KEY (see `inferq tenant create`)")
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout_s,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def submit(
        self,
        task: str,
        input: dict[str, Any],
        *,
        params: dict[str, Any] | None = None,
        model: str | None = None,
        priority: str = "interactive",
        idempotency_key: str | None = None,
        webhook_url: str | None = None,
    ) -> str:
        """Queue one request; return its id. Routing picks the model unless ``model`` names one."""
        body: dict[str, Any] = {"task": task, "input": input, "priority": priority}
        optional = {
            "params": params,
            "model": model,
            "idempotency_key": idempotency_key,
            "webhook_url": webhook_url,
        }
        body.update({key: value for key, value in optional.items() if value is not None})
        return str(self._json(self._http.post("/v1/requests", json=body))["id"])

    def get(self, request_id: str) -> Result:
        return Result.of(self._json(self._http.get(f"/v1/requests/{request_id}")))

    def wait(self, request_id: str, *, timeout_s: float = 300.0) -> Result:
        """Long-poll until the request ends (in whatever state); TimeoutError past ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            wait = max(min(left, _MAX_POLL_S), 0.0)
            response = self._http.get(f"/v1/requests/{request_id}", params={"wait": wait})
            result = Result.of(self._json(response))
            if result.done:
                return result
            if left <= 0:
                raise TimeoutError(f"request {request_id} still {result.status} after {timeout_s}s")

    def generate(
        self, task: str, input: dict[str, Any], *, timeout_s: float = 300.0, **options: Any
    ) -> Result:
        """Submit and wait; raise :class:`RequestFailed` unless it succeeded.

        Args:
            task: The task kind (``chat``, ``complete``, ``classify``, ``extract``, ``expand``).
            input: The task kind's input.
            timeout_s: How long to wait for the result.
            **options: ``params``, ``model``, ``priority``, ... as :meth:`submit` takes them.
        """
        result = self.wait(self.submit(task, input, **options), timeout_s=timeout_s)
        if result.status != "succeeded":
            raise RequestFailed(result)
        return result

    def submit_job(self, path: Path, spec: dict[str, Any]) -> dict[str, Any]:
        """Upload a JSONL file as one job with shared ``spec`` (task, input, params, model)."""
        with path.open("rb") as handle:
            files = {"file": (path.name, handle, "application/x-ndjson")}
            return self._json(
                self._http.post("/v1/jobs", data={"job": json.dumps(spec)}, files=files)
            )

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json(self._http.get(f"/v1/jobs/{job_id}"))

    def jobs(self, limit: int = 50) -> list[dict[str, Any]]:
        return list(self._json(self._http.get("/v1/jobs", params={"limit": limit}))["data"])

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json(self._http.post(f"/v1/jobs/{job_id}/cancel"))

    def download(self, job_id: str, what: str = "results") -> Iterator[bytes]:
        """Stream a job's ``results`` or ``errors`` file."""
        with self._http.stream("GET", f"/v1/jobs/{job_id}/{what}") as response:
            if response.status_code >= 400:
                response.read()
                self._json(response)
            yield from response.iter_bytes()

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ApiError(f"{response.status_code}: {detail}")
        body: dict[str, Any] = response.json()
        return body
