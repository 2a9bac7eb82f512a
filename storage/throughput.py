"""Throughput at P95 latency: the rate sustained per time bucket, and the best one within a target.

A rate over a whole report window says little: ``--since 24h`` over ten minutes of work divides
the successes by a day. So the report fits its window to the data (first to last ledger row),
cuts it into buckets whose size follows the data's span, and takes per bucket the successes
that finished in it ÷ the bucket's length, next to the p95 end-to-end latency of those same
successes. The headline is the best such rate whose p95 stayed within a target: the rate the
service held while it met its latency.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from storage.ledger_stats import AttemptRow, GroupStats, Window, over_time

# Bucket lengths a reader takes in at a glance, in seconds: 5 s up to a week. None shorter: a
# rate over a second or two is a burst (one success reads "1 ok/s"), not a rate sustained.
NICE_BUCKETS_S: tuple[int, ...] = (5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)
NICE_BUCKETS_S += (7200, 10800, 21600, 43200, 86400, 604800)
DEFAULT_P95_TARGET_S = 10.0


def fit_window(rows: Sequence[AttemptRow], window: Window) -> Window:
    """The requested window shrunk to its first and last ledger row; as asked when empty.

    Args:
        rows: the window's attempts in time order (as :func:`fetch_attempts` returns them).
        window: the window the rows were fetched for.
    """
    if not rows:
        return window
    return Window(max(rows[0].at, window.since), min(rows[-1].at, window.until))


def bucket_seconds(span_s: float, *, max_buckets: int) -> float:
    """The shortest nice bucket length that cuts ``span_s`` into at most ``max_buckets``."""
    wanted = span_s / max(max_buckets, 1)
    for size in NICE_BUCKETS_S:
        if size >= wanted:
            return float(size)
    return float(math.ceil(wanted / NICE_BUCKETS_S[-1]) * NICE_BUCKETS_S[-1])


def buckets_over(
    rows: Sequence[AttemptRow], window: Window, *, bucket_s: float
) -> list[GroupStats]:
    """All attempts in buckets of ``bucket_s`` from the window's start, enough to cover it.

    Each bucket's ``throughput`` is its successes ÷ ``bucket_s`` (the last bucket may run past
    the window's end and is still divided by the full length, so no rate is overstated).
    """
    count = max(math.ceil(window.seconds / bucket_s), 1)
    covered = Window(window.since, window.since + timedelta(seconds=count * bucket_s))
    return over_time(rows, covered, buckets=count)


@dataclass(frozen=True, slots=True)
class AtP95:
    """The best bucket rate whose p95 end-to-end latency stayed within the target.

    ``rate`` and the bucket's ``p95_s`` and ``start`` are None when no bucket with
    successes met the target; ``peak_rate`` is the best bucket rate whatever its p95.
    """

    target_s: float
    bucket_s: float
    rate: float | None
    p95_s: float | None
    start: str | None
    peak_rate: float


def throughput_at_p95(buckets: Sequence[GroupStats], *, target_s: float) -> AtP95:
    """Pick the headline from buckets made by :func:`buckets_over` (ties: the earliest)."""
    width = buckets[0].window_s if buckets else 0.0
    worked = [b for b in buckets if b.successes]
    held = [b for b in worked if b.end_to_end.p95 <= target_s]
    peak = max((b.throughput for b in worked), default=0.0)
    if not held:
        return AtP95(target_s, width, None, None, None, peak)
    best = max(held, key=lambda b: b.throughput)  # max keeps the first of equals
    return AtP95(target_s, width, best.throughput, best.end_to_end.p95, best.key, peak)
