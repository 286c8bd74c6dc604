"""Time the candidate full zero checks on all-zero grads, the case the check exists for.

Usage:
    python benchmarks/bench_check.py           # sizes 2e3, 1.25e5, 2.1e6, 6.4e7 (float32, CPU)
    python benchmarks/bench_check.py --rows    # the row checks of lazy="rows" on a 1M x 64 grad

safeopt's full check (``safeopt/_rule.py``) is ``torch.aminmax``: exact on its own (a grad is
nonzero when its minimum or maximum is; NaN propagates). The other rows show why nothing cheaper
is used: ``amax`` alone cannot decide (a maximum of 0 may hide negative elements), so on an
all-zero grad it needs ``amin`` as well. Median of 7 rounds, milliseconds a call.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def _ms(fn: Callable[[], object], calls: int) -> float:
    fn()
    rounds = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(rounds)


def whole(sizes: list[int]) -> None:
    print("| elements | aminmax (used) | amax | amax then amin | amax of an int32 view |")
    print("|---|---|---|---|---|")
    for n in sizes:
        g = torch.zeros(n)
        calls = max(3, 20_000_000 // n)
        cells = [
            _ms(lambda: torch.aminmax(g), calls),
            _ms(lambda: g.amax(), calls),
            _ms(lambda: (g.amax(), g.amin()), calls),
            _ms(lambda: g.view(torch.int32).amax(), calls),
        ]
        print(f"| {n:,} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")


def rows() -> None:
    g = torch.zeros(1_000_000, 64)
    g[torch.randperm(1_000_000)[:10_000]] = 1.0
    candidates: dict[str, Callable[[], object]] = {
        "amax of a uint8 view, per row (used)": lambda: g.view(torch.uint8).amax(1),
        "amax of an int32 view, per row": lambda: g.view(torch.int32).amax(1),
        "float amax, per row": lambda: g.amax(1),
        "float sum, per row": lambda: g.sum(1),
        "aminmax, per row": lambda: torch.aminmax(g, dim=1),
        "ne(0).any, per row": lambda: g.ne(0).any(1),
        "aminmax of the whole grad (no rows)": lambda: torch.aminmax(g),
    }
    print("| 1M x 64 float32 grad | ms |")
    print("|---|---|")
    for name, fn in candidates.items():
        print(f"| {name} | {_ms(fn, 3):.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", action="store_true", help='the row checks of lazy="rows"')
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.rows:
        rows()
    else:
        whole([2_000, 125_000, 2_100_000, 64_000_000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
