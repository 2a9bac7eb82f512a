"""Rounds that alternate the two sides, and the medians over them.

The machine is noisy (the same direct run ranged 167-234 requests/s), so each side runs once a
round, the side that goes first swaps every round, each ratio is taken within its round, and
the figures reported are medians over rounds.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

Figures = dict[str, float]


def paired(
    number: int, service: Callable[[], Figures], direct: Callable[[], Figures]
) -> tuple[Figures, str]:
    """Both sides' figures of round ``number`` (from 1) and which side went first."""
    if number % 2:
        figures = service()
        figures.update(direct())
        return figures, "service"
    figures = direct()
    figures.update(service())
    return figures, "direct"


def medians(rounds: Sequence[Figures]) -> Figures:
    return {name: round(statistics.median(r[name] for r in rounds), 3) for name in rounds[0]}


def show(label: str, figures: Figures) -> str:
    return f"{label}: " + ", ".join(f"{k} {v:.3g}" for k, v in figures.items())
