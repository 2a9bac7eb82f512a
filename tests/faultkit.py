"""Real services to break, and the invariant checked after breaking them.

Fault tests kill and stop things, so they own what they break: a Redis and a Postgres cluster
started here on spare ports (the shared ones are never touched), and `inferq` API and worker
processes pointed at them. After a fault the database is checked: every request reached
exactly one terminal state, a succeeded one has exactly one successful ledger row, and every
extra execution is in the ledger as a duplicate.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.enums import OPEN_STATUSES, Outcome, RequestStatus
from core.settings import Settings
from storage.tables import LedgerEntry, Request
from tests.conftest import (
    MODELS_DIR,
    ROOT,
    Process,
    free_port,
    service_env,
    start,
    wait_for,
    wait_healthy,
)

START_TIMEOUT_S = 240.0
DRAIN_TIMEOUT_S = 240.0


def binary(name: str) -> str:
    """A server binary the fault tests need; missing fails the test, it does not skip it."""
    found = shutil.which(name) or shutil.which(
        name, path="/usr/local/bin:/usr/lib/postgresql/15/bin"
    )
    if found is None:
        pytest.fail(f"fault tests need the {name!r} binary on PATH")
    return found


class RedisServer:
    """A throwaway redis-server with no persistence: a kill -9 loses every message in it."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._workdir = workdir
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self._workdir)]
        log = (self._workdir / "redis.log").open("ab")
        self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_timeout=1)
        wait_for(lambda: _pings(client), timeout=30, what="redis-server to answer")

    def queued_messages(self) -> int:
        """Messages waiting on the model queues (a message is a bundle of requests)."""
        client = redis.Redis(port=self.port, socket_timeout=5)
        keys = client.scan_iter("*inferq.model.*", _type="list")  # not kombu's binding sets
        return sum(int(client.llen(key)) for key in keys)

    def kill(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGKILL)
        self._proc.wait()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self.kill()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


class PostgresServer:
    """A cluster of its own (initdb into a temporary folder, trust auth, a private socket dir).

    Postgres refuses to run as root, so under root it runs as the ``postgres`` user.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.root = Path(tempfile.mkdtemp(prefix="inferq-faults-pg-"))
        self._data = self.root / "data"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            self._as_user = [shutil.which("runuser") or "runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres")

    def _run(self, *args: str) -> None:
        done = subprocess.run([*self._as_user, *args], capture_output=True, text=True, check=False)
        if done.returncode:
            pytest.fail(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")

    def init(self) -> None:
        initdb = binary("initdb")
        self._run(initdb, "-D", str(self._data), "-U", "postgres", "--auth=trust", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.root / "postgres.log")
        self._run(binary("pg_ctl"), "-D", str(self._data), "-o", options, "-l", log, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(binary("pg_ctl"), "-D", str(self._data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        if (self._data / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Stack:
    """`inferq` processes against this test's own Redis and Postgres."""

    settings: Settings
    env: dict[str, str]
    log_dir: Path
    processes: list[Process] = field(default_factory=list)
    url: str = ""  # the API last started

    @classmethod
    def build(
        cls, *, database_url: str, broker_url: str, config: Path, log_dir: Path, **env: object
    ) -> Stack:
        settings = Settings(
            database_url=database_url,
            broker_url=broker_url,
            config=config,
            models_dir=MODELS_DIR,
            cache_dir=ROOT / ".cache",
        )
        full = service_env(settings)
        full.update({f"INFERQ_{k.upper()}": str(v) for k, v in env.items()})
        return cls(settings, full, log_dir)

    def launch(self, name: str, args: list[str]) -> Process:
        taken = {p.name for p in self.processes}
        unique = next(f"{name}-{n}" for n in range(1, 1000) if f"{name}-{n}" not in taken)
        process = start(unique, args, self.env, self.log_dir)
        self.processes.append(process)
        return process

    def worker(self, model: str, *, wait: bool = True) -> Process:
        process = self.launch(f"worker-{model}", ["worker", "--model", model])
        if wait:
            self.wait_ready(process)
        return process

    def wait_ready(self, process: Process) -> None:
        def ready() -> bool:
            if process.proc.poll() is not None:
                pytest.fail(f"{process.name} exited:\n{process.tail()}")
            return is_ready(process)

        wait_for(ready, timeout=START_TIMEOUT_S, what=f"{process.name} to be ready")

    def api(self) -> tuple[Process, str]:
        port = free_port()
        process = self.launch("api", ["api", "--port", str(port)])
        url = f"http://127.0.0.1:{port}"
        wait_healthy(process, url)
        self.url = url
        return process, url

    def stop_all(self) -> None:
        for process in self.processes:
            if process.proc.poll() is None:
                kill9(process)


def is_ready(process: Process) -> bool:
    """A live worker that has logged Celery's ``ready.``: it consumes its queue."""
    return process.proc.poll() is None and "ready." in process.log.read_text(errors="replace")


def kill9(process: Process) -> float:
    """SIGKILL: no shutdown hooks, no acks, no rollback. Returns when it happened."""
    process.proc.send_signal(signal.SIGKILL)
    process.proc.wait()
    return time.monotonic()


def seconds_until(
    predicate: Callable[[], bool], *, since: float, timeout: float, what: str
) -> float:
    """Wait for ``predicate`` and return the seconds since ``since`` (a monotonic time)."""
    wait_for(predicate, timeout=timeout, what=what)
    return time.monotonic() - since


def status_counts(sessions: sessionmaker[Session], tenant_id: uuid.UUID) -> dict[str, int]:
    with sessions() as session:
        rows = session.execute(
            select(Request.status, func.count())
            .where(Request.tenant_id == tenant_id)
            .group_by(Request.status)
        ).all()
    return {str(status): count for status, count in rows}


def open_count(sessions: sessionmaker[Session], tenant_id: uuid.UUID) -> int:
    counts = status_counts(sessions, tenant_id)
    return sum(counts.get(str(s), 0) for s in OPEN_STATUSES)


def settled(sessions: sessionmaker[Session], tenant_id: uuid.UUID, expected: int) -> bool:
    """Every one of ``expected`` requests is in a terminal state (a database outage is a no)."""
    try:
        counts = status_counts(sessions, tenant_id)
    except Exception:
        return False
    open_ = sum(counts.get(str(s), 0) for s in OPEN_STATUSES)
    return sum(counts.values()) >= expected and open_ == 0


@dataclass(frozen=True, slots=True)
class Figures:
    """What a fault test reports: lost and duplicated work, and how long recovery took."""

    requests: int
    lost: int
    duplicate_results: int
    duplicate_executions: int
    by_status: dict[str, int]

    def show(self, test: str, **extra: object) -> None:
        parts = [
            f"requests={self.requests}",
            f"lost={self.lost}",
            f"duplicate_results={self.duplicate_results}",
            f"duplicate_executions={self.duplicate_executions}",
            *(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()),
            f"statuses={self.by_status}",
        ]
        print(f"\n[faults] {test}: " + " ".join(parts))


def check_invariant(
    sessions: sessionmaker[Session], tenant_id: uuid.UUID, *, expected: int
) -> Figures:
    """Assert the durability invariant over a tenant's requests and return the figures."""
    with sessions() as session:
        requests = session.execute(
            select(Request.id, Request.status, Request.error, Request.output).where(
                Request.tenant_id == tenant_id
            )
        ).all()
        ledger = session.execute(
            select(LedgerEntry.request_id, LedgerEntry.outcome, func.count())
            .where(LedgerEntry.tenant_id == tenant_id)
            .group_by(LedgerEntry.request_id, LedgerEntry.outcome)
        ).all()
    rows: dict[uuid.UUID, dict[Outcome, int]] = {}
    for request_id, outcome, count in ledger:
        rows.setdefault(request_id, {})[outcome] = count
    by_status: dict[str, int] = {}
    lost, doubled, problems = 0, 0, []
    for request_id, status, error, output in requests:
        by_status[str(status)] = by_status.get(str(status), 0) + 1
        wins = rows.get(request_id, {}).get(Outcome.SUCCEEDED, 0)
        if status in OPEN_STATUSES:
            lost += 1
        elif status is RequestStatus.SUCCEEDED and (wins != 1 or output is None):
            problems.append(f"{request_id} succeeded with {wins} successful ledger rows")
        elif status is not RequestStatus.SUCCEEDED and (wins or not error):
            problems.append(f"{request_id} {status} with {wins} successes, error {error!r}")
        doubled += wins > 1
    lost += expected - len(requests)
    duplicates = sum(r.get(Outcome.DUPLICATE, 0) for r in rows.values())
    figures = Figures(len(requests), lost, doubled, duplicates, by_status)
    assert len(requests) == expected, f"{len(requests)} requests stored, {expected} expected"
    assert lost == 0, f"{lost} requests never finished: {by_status}"
    assert not problems, f"{len(problems)} broken requests, e.g. {problems[:5]}"
    return figures
