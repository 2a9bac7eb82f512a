"""CPU seconds by process group, read from ``/proc/<pid>/stat`` (utime + stime, children's
threads included), so a benchmark can say which process pays for a request.

A group is a process tree (the API, one worker) or a set picked by its command line (the
Postgres backends serving one database, the Redis server). A process that exits inside the
window takes its CPU with it; the services here keep theirs for the whole run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

_TICK_S = 1 / os.sysconf("SC_CLK_TCK")

Picker = Callable[["Proc", Mapping[int, "Proc"]], bool]


@dataclass(frozen=True, slots=True)
class Proc:
    pid: int
    ppid: int
    cmdline: str
    cpu_s: float


def snapshot() -> dict[int, Proc]:
    procs: dict[int, Proc] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # The command name in parentheses may hold spaces: split after its closing one.
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) * _TICK_S
        procs[int(entry.name)] = Proc(int(entry.name), int(fields[1]), cmdline.strip(), cpu)
    return procs


def tree(root: int) -> Picker:
    """``root`` and its descendants."""

    def pick(proc: Proc, procs: Mapping[int, Proc]) -> bool:
        pid = proc.pid
        while pid > 1:
            if pid == root:
                return True
            parent = procs.get(pid)
            if parent is None:
                return False
            pid = parent.ppid
        return False

    return pick


def command(*parts: str) -> Picker:
    """Processes whose command line holds every one of ``parts``."""
    return lambda proc, _procs: all(part in proc.cmdline for part in parts)


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (every core, anyone's processes)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) * _TICK_S


class CpuMeter:
    """CPU seconds each named group used between :meth:`start` and :meth:`stop`, and the
    whole machine's (``machine``: on a shared machine, others' work shows there)."""

    def __init__(self, groups: Mapping[str, Picker]) -> None:
        self._groups = dict(groups)
        self._before: dict[int, Proc] = {}

    def start(self) -> None:
        self._machine = machine_busy_s()
        self._before = snapshot()

    def stop(self) -> dict[str, float]:
        after = snapshot()
        used = {name: 0.0 for name in self._groups}
        used["machine"] = machine_busy_s() - self._machine
        for pid, proc in after.items():
            start = self._before.get(pid)
            delta = proc.cpu_s - (start.cpu_s if start is not None else 0.0)
            for name, pick in self._groups.items():
                if pick(proc, after):
                    used[name] += delta
                    break
        return used
