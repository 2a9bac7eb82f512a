"""The models config in force, kept current without a restart.

What a process routes by is the config file overlaid with the canary decisions recorded in
Postgres (``router.canary.apply_decisions``). :class:`LiveConfig` holds it and reloads it when
the file's modification time changes, when a decision is recorded (``storage.canary``'s mark
moves), or at once on SIGHUP; a thread looks every ``config_poll_s`` seconds, which costs one
``stat`` and one indexed ``max(id)``. A file that no longer loads is logged and the config in
force stays. So does one that adds or removes models: their queues, tokenizers and engines
are set up when a process starts, so that change needs a restart.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from celery.signals import worker_ready
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from router import ConfigError, Decision, RouterConfig, Verdict, apply_decisions, load_config
from storage.canary import decisions_mark, latest_decisions

log = logging.getLogger(__name__)


def recorded_decisions(session: Session) -> list[Decision]:
    """The latest decision of each route, as the router reads them."""
    return [
        Decision(route=row.route, candidate=row.candidate, verdict=Verdict(row.verdict))
        for row in latest_decisions(session)
    ]


def effective_config(path: Path, sessions: sessionmaker[Session]) -> RouterConfig:
    """The file's config with the recorded decisions applied (raises ``ConfigError``)."""
    config = load_config(path)
    with sessions() as session:
        return apply_decisions(config, recorded_decisions(session))


class LiveConfig:
    """The config in force for one process, and the thread that keeps it current.

    Args:
        path: The models config file.
        sessions: Where decisions are read.
        poll_s: How often to look for a change.
        on_change: Called with each new config (from the polling thread or ``check``).
    """

    def __init__(
        self,
        path: Path,
        sessions: sessionmaker[Session],
        *,
        poll_s: float,
        on_change: Callable[[RouterConfig], None] = lambda _: None,
    ) -> None:
        self._path = Path(path)
        self._sessions = sessions
        self._poll_s = poll_s
        self._on_change = on_change
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._force = False
        self._seen = (self._mtime(), self._mark())
        try:
            self._config = effective_config(self._path, sessions)
        except SQLAlchemyError:  # no decisions to read yet: the file alone, until the next look
            log.warning("starting on %s without the canary decisions", path, exc_info=True)
            self._config = load_config(self._path)
            self._seen = (self._seen[0], -1)

    def current(self) -> RouterConfig:
        return self._config

    def check(self, *, force: bool = False) -> bool:
        """Reload when the file or the decisions changed (or ``force``); True if it did."""
        with self._lock:
            seen = (self._mtime(), self._mark())
            if seen == self._seen and not force:
                return False
            self._seen = seen
            try:
                config = effective_config(self._path, self._sessions)
            except (ConfigError, SQLAlchemyError) as exc:
                log.error("config not reloaded, the one in force stays: %s", exc)
                return False
            if set(config.models) != set(self._config.models):
                log.error(
                    "config not reloaded: %s adds or removes models (%s); restart to apply it",
                    self._path,
                    ", ".join(sorted(set(config.models) ^ set(self._config.models))),
                )
                return False
            if config == self._config:
                return False
            self._config = config
        log.info("config reloaded from %s and the canary decisions", self._path)
        self._on_change(config)
        return True

    def request_reload(self) -> None:
        """Reload at once on the polling thread (what SIGHUP does; safe in a handler)."""
        self._force = True
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="inferq-config", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def install_sighup(self) -> bool:
        """Reload on SIGHUP. Only the main thread may set a handler; False where not."""
        if threading.current_thread() is not threading.main_thread():
            return False

        def reload(_signum: int, _frame: FrameType | None) -> None:
            self.request_reload()

        signal.signal(signal.SIGHUP, reload)
        return True

    def install_sighup_when_ready(self) -> None:
        """In a Celery worker: its own SIGHUP handler (re-exec the worker) is set as it starts,
        so take the signal over once the worker is ready, on its main thread."""

        def take_over(**_: object) -> None:
            if not self.install_sighup():
                log.warning("SIGHUP does not reload the config in this worker")

        worker_ready.connect(take_over, weak=False)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._poll_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            force, self._force = self._force, False
            try:
                self.check(force=force)
            except Exception:  # the thread must outlive a bad moment
                log.exception("config check failed")

    def _mtime(self) -> tuple[int, int]:
        try:
            stat = self._path.stat()
        except OSError:
            return (-1, -1)
        return (stat.st_mtime_ns, stat.st_size)

    def _mark(self) -> int:
        try:
            with self._sessions() as session:
                return decisions_mark(session)
        except SQLAlchemyError:
            log.warning("no canary decisions from the database", exc_info=True)
            return -1
