"""Readiness and liveness of a worker, answered on its metrics port beside ``/metrics``.

``/readyz`` is 200 once the engine has loaded and the runtime runs, 503 before: a rollout waits
for a loaded worker. ``/healthz`` is 200 while the engine makes progress (idle, or its current
step or call younger than ``INFERQ_ENGINE_STALL_S``) and 503 past that: the engine's watchdog
then stops the worker with exit 70, and the probe restarts one whose watchdog could not (a
process too stuck to answer fails it by timing out). Every other path serves the metrics.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class Probes:
    """What the probes report. Until :meth:`started`, the worker is loading: live, not ready."""

    def __init__(self) -> None:
        self._progressing: Callable[[], bool] | None = None

    def started(self, progressing: Callable[[], bool]) -> None:
        """The engine has loaded and the runtime runs; ``progressing`` is its stall check."""
        self._progressing = progressing

    def ready(self) -> bool:
        return self._progressing is not None

    def live(self) -> bool:
        progressing = self._progressing
        return progressing is None or progressing()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes come every few seconds: no access log."""


def serve(registry: CollectorRegistry, probes: Probes, port: int, host: str) -> Any:
    """Serve the probes and the registry's metrics on a daemon thread; returns the server."""
    metrics = make_wsgi_app(registry)
    checks = {"/healthz": probes.live, "/readyz": probes.ready}

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        check = checks.get(environ.get("PATH_INFO", ""))
        if check is None:
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        ok = check()
        status = "200 OK" if ok else "503 Service Unavailable"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [b"ok\n" if ok else b"unavailable\n"]

    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="inferq-metrics", daemon=True).start()
    return server
