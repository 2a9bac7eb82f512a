"""A small HTTP client for inferq's native API (jobs for now), used by the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx


class ApiError(RuntimeError):
    """The API refused a call; the message is the API's own."""


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
