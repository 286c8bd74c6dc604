"""Which zero check: the candidates for "is this grad all zero?", timed on all-zero grads.

Usage:
    python benchmarks/bench_check.py           # whole-grad checks, 2e3 to 6.4e7 float32 elements (CPU)
    python benchmarks/bench_check.py --rows    # the per-row checks of lazy="rows" on a 1M x 64 grad

safeopt's full check (``safeopt/_rule.py``) is ``torch.aminmax``: exact on its own (a grad is
nonzero when its minimum or maximum is; NaN propagates). The other candidates show why nothing
cheaper is used: ``amax`` alone cannot decide (a maximum of 0 may hide negative elements), so on an
all-zero grad it needs ``amin`` as well. Each is timed with ``torch.utils.benchmark``
(``Timer.blocked_autorange``) and printed with ``Compare``.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.benchmark import Compare, Measurement, Timer

WHOLE = {
    "aminmax (used)": "torch.aminmax(g)",
    "amax": "g.amax()",
    "amax then amin": "(g.amax(), g.amin())",
    "amax of an int32 view": "g.view(torch.int32).amax()",
}
ROWS = {
    "amax of a uint8 view, per row (used)": "g.view(torch.uint8).amax(1)",
    "amax of an int32 view, per row": "g.view(torch.int32).amax(1)",
    "float amax, per row": "g.amax(1)",
    "float sum, per row": "g.sum(1)",
    "aminmax, per row": "torch.aminmax(g, dim=1)",
    "ne(0).any, per row": "g.ne(0).any(1)",
    "aminmax of the whole grad (no rows)": "torch.aminmax(g)",
}


def _time(stmt: str, g: torch.Tensor, sub_label: str, description: str) -> Measurement:
    timer = Timer(
        stmt,
        globals={"g": g, "torch": torch},
        label="zero check of an all-zero float32 grad",
        sub_label=sub_label,
        description=description,
        num_threads=torch.get_num_threads(),
    )
    return timer.blocked_autorange(min_run_time=0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", action="store_true", help='the per-row checks of lazy="rows"')
    args = parser.parse_args(argv)
    results = []
    if args.rows:
        g = torch.zeros(1_000_000, 64)
        g[torch.randperm(1_000_000)[:10_000]] = 1.0
        results = [_time(stmt, g, name, "1M x 64, 1% of rows nonzero") for name, stmt in ROWS.items()]
    else:
        for n in (2_000, 125_000, 2_100_000, 64_000_000):
            g = torch.zeros(n)
            results += [_time(stmt, g, f"{n:,} elements", name) for name, stmt in WHOLE.items()]
    compare = Compare(results)
    compare.trim_significant_figures()
    compare.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
