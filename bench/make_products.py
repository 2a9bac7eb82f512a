"""Generate the sample product catalogue, deterministically, as JSON lines on stdout.

Usage: ``python -m bench.make_products > inferq/data/products.jsonl``

Each line is ``{"id": "p0001", "text": "...", "attributes": {...}}``; the generator itself is
:mod:`inferq.training.products`, shared with training and evaluation.
"""

from __future__ import annotations

import json
import random
import sys

from inferq.training.products import make_product

SEED = 20261127
COUNT = 240


def main() -> None:
    """Write ``COUNT`` products as UTF-8 JSON lines to stdout, whatever the locale."""
    rng = random.Random(SEED)
    out = sys.stdout.buffer
    for index in range(1, COUNT + 1):
        line = json.dumps(make_product(rng, index), ensure_ascii=False) + "\n"
        out.write(line.encode("utf-8"))


if __name__ == "__main__":
    main()
