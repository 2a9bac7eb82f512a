"""Where a process's Python time goes during a benchmark run: ``py-spy record`` (the dev
extra) on each process for the run's length, sampling only threads that hold the GIL, folded
into each of our functions' share of the run (its own code and the library calls it makes).

A share is of wall time: 0.40 means the process ran that function, holding the GIL, for 40 %
of the run; ``gil`` is the share of any Python code at all. A process whose ``gil`` share is
near 1.0 is bound by its own Python, and its largest shares say which calls.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from functools import cache
from pathlib import Path

RATE_HZ = 100
_FRAME = re.compile(r"^(?P<function>.+?) \((?P<path>[^:()]+)(?::\d+)?\)$")


class Profiler:
    """``py-spy record`` on ``pids`` (name → pid) from :meth:`start` to :meth:`stop`."""

    def __init__(self, pids: dict[str, int], *, top: int = 8) -> None:
        self._pids = pids
        self._top = top
        self._dir = Path(tempfile.mkdtemp(prefix="inferq-profile-"))
        self._running: dict[str, subprocess.Popen[bytes]] = {}
        self._started = 0.0
        self.shares: dict[str, dict[str, float]] = {}

    def start(self) -> None:
        beside = Path(sys.executable).parent / "py-spy"  # the venv's, when not on PATH
        spy = shutil.which("py-spy") or (str(beside) if beside.exists() else None)
        if spy is None:
            raise SystemExit("bench: --profile needs py-spy (pip install -e '.[dev]')")
        for name, pid in self._pids.items():
            command = [spy, "record", "--pid", str(pid), "--rate", str(RATE_HZ), "--gil"]
            command += ["--subprocesses", "--nonblocking", "--format", "raw"]
            command += ["--output", str(self._dir / f"{name}.txt")]
            log = (self._dir / f"{name}.log").open("wb")
            self._running[name] = subprocess.Popen(command, stdout=log, stderr=log)
        self._started = time.monotonic()

    def stop(self) -> dict[str, dict[str, float]]:
        """Each process's ``gil`` share and its top functions' shares, largest first (also
        kept as :attr:`shares`)."""
        elapsed = time.monotonic() - self._started
        for process in self._running.values():
            process.send_signal(signal.SIGINT)  # py-spy writes what it sampled, then exits
        shares: dict[str, dict[str, float]] = {}
        for name, process in self._running.items():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
            output = self._dir / f"{name}.txt"
            if not output.exists():
                log = (self._dir / f"{name}.log").read_text(errors="replace").strip()
                raise SystemExit(f"bench: py-spy got no samples of {name}: {log[-500:]}")
            shares[name] = fold(output.read_text(), RATE_HZ * elapsed, self._top)
        self._running.clear()
        self.shares = shares
        return shares


def fold(collapsed: str, possible: float, top: int) -> dict[str, float]:
    """Collapsed stacks (``frame;frame;... count`` a line) → the share of ``possible``
    samples spent in any Python (``gil``), then in each of our functions, the ``top``
    largest: a sample counts for the innermost of our functions on its stack, so a share
    is the function's own code and the library code it calls (a loop that only calls
    other functions of ours has none)."""
    total = 0
    innermost: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples = int(count)
        total += samples
        ours = [name for frame in stack.split(";") if (name := _ours(frame)) is not None]
        innermost[ours[-1] if ours else "(not ours)"] += samples
    shares = {"gil": round(total / possible, 3)}
    shares.update({n: round(c / possible, 3) for n, c in innermost.most_common(top)})
    return shares


def _ours(frame: str) -> str | None:
    """``module.function`` for a frame of our packages, else None (py-spy names a file by
    its path under the ``sys.path`` entry it came from)."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return None
    parts = Path(match["path"]).with_suffix("").parts
    if not parts or parts[0] not in _packages():
        return None
    return ".".join(parts) + "." + match["function"]


@cache
def _packages() -> frozenset[str]:
    """The service's packages (every top-level one of this checkout but the benchmarks and the
    tests): their functions are reported; library frames count toward their callers."""
    root = Path(__file__).resolve().parents[1]
    return frozenset(p.parent.name for p in root.glob("*/__init__.py")) - {"bench", "tests"}
