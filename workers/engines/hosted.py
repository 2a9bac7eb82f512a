"""Hosted adapter: an OpenAI-compatible HTTP API (OpenAI itself, vLLM's server, others).

A batch becomes concurrent HTTP calls, at most ``max_concurrency`` in flight. Nothing is
retried here: any failed call fails the batch with ``EngineError`` and the worker's splitting,
fallback and poison logic decide what happens next. Calls that did succeed in a failed batch
are remembered for the split that follows, so a neighbour's failure does not pay for them twice.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx

from router.config import ModelSpec
from tasks.contract import EngineRequest
from workers.engines.base import EngineError, Generation

OPTIONS = frozenset({"model", "timeout_s", "max_concurrency", "strict"})
MEMO_LIMIT = 4096  # successes kept for a split; only a run of failing splits gets near it


class HostedEngine:
    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_concurrency: int = 8,
        strict: bool = True,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            limits=httpx.Limits(max_connections=max_concurrency),
        )
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="inferq-hosted")
        self._model = model
        self._strict = strict
        self._memo: dict[int, tuple[EngineRequest, Generation]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> HostedEngine:
        """Options: ``model`` (the remote name), ``timeout_s``, ``max_concurrency``, ``strict``."""
        unknown = set(spec.options) - OPTIONS
        if unknown:
            raise ValueError(f"openai engine: unknown options {sorted(unknown)}")
        api_key = None
        if spec.api_key_env:
            api_key = os.environ.get(spec.api_key_env)
            if not api_key:
                raise ValueError(f"api_key_env: environment variable {spec.api_key_env} is unset")
        options = spec.options
        return cls(
            str(spec.base_url),
            str(options["model"]),
            api_key=api_key,
            timeout_s=float(options.get("timeout_s", 60.0)),
            max_concurrency=int(options.get("max_concurrency", 8)),
            strict=bool(options.get("strict", True)),
        )

    def generate(self, requests: Sequence[EngineRequest]) -> list[Generation]:
        with self._lock:
            known = [self._memo.pop(id(r), None) for r in requests]
        calls: list[Future[Generation]] = []
        for request, hit in zip(requests, known, strict=True):
            if hit is not None and hit[0] is request:
                calls.append(Future())
                calls[-1].set_result(hit[1])
            else:
                calls.append(self._pool.submit(self._call, request))
        errors = [c.exception() for c in calls]
        if not any(errors):
            return [c.result() for c in calls]
        with self._lock:
            if len(self._memo) > MEMO_LIMIT:
                self._memo.clear()
            for request, call, error in zip(requests, calls, errors, strict=True):
                if error is None:
                    self._memo[id(request)] = (request, call.result())
        raise next(e for e in errors if e is not None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    def _call(self, request: EngineRequest) -> Generation:
        path, body = self._body(request)
        try:
            response = self._http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise EngineError(f"{self._http.base_url}{path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 400:
            raise EngineError(f"{path}: HTTP {response.status_code}: {response.text[:300]}")
        try:
            payload = response.json()
            choices = payload["choices"]
            texts = [_text(c) for c in sorted(choices, key=lambda c: c.get("index", 0))]
            if len(texts) == 1:
                texts *= request.n  # a greedy n > 1 was asked once
        except (ValueError, KeyError, TypeError) as exc:
            raise EngineError(f"{path}: unexpected answer: {response.text[:300]}") from exc
        usage = payload.get("usage") or {}
        return Generation(
            texts=texts,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            finish_reason=choices[0].get("finish_reason"),
        )

    def _body(self, request: EngineRequest) -> tuple[str, dict[str, Any]]:
        """The request in the API's words; chats go to chat completions, raw prompts to
        (legacy) completions, so no chat template is applied to them."""
        body: dict[str, Any] = {
            "model": self._model,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            # Greedy decoding gives n equal answers; servers such as vLLM refuse n > 1 then.
            "n": 1 if request.temperature == 0 else request.n,
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = request.stop
        if request.ignore_eos:
            body["ignore_eos"] = True  # a vLLM extension; other servers may refuse it
        if request.json_schema is not None:
            schema = {"name": "output", "schema": request.json_schema, "strict": self._strict}
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif request.choices is not None:
            # vLLM's extension; its older ``guided_choice`` is ignored without error since 0.3x.
            body["structured_outputs"] = {"choice": request.choices}
        if request.messages is None:
            return "completions", {**body, "prompt": request.prompt or ""}
        return "chat/completions", {**body, "messages": [m.model_dump() for m in request.messages]}


def _text(choice: dict[str, Any]) -> str:
    if "message" in choice:
        return str(choice["message"].get("content") or "")
    return str(choice["text"])
