"""The fixed cost safeopt adds to a step: microseconds a step plus microseconds a parameter tensor.

Usage:
    python benchmarks/bench_fixed_cost.py               # Adam fused, forloop and foreach; 1 to 256 tensors
    python benchmarks/bench_fixed_cost.py --quick       # fused only, fewer rounds
    python benchmarks/bench_fixed_cost.py --out benchmarks/results

Parameters of 16 elements each (so torch's own step is as cheap as it gets and what is left is
Python), every one active, on the CPU. For each count of tensors, torch's step and safeopt's twin
step copies of the same parameters with the same grads, in one process: many short rounds (a
block of a few steps of each, the order alternating round by round), each timed by the thread's
CPU clock (``time.thread_time_ns``: a thread waiting for a core shared with other jobs is not
counted; ``--clock wall`` for ``perf_counter_ns``). The added cost is the median over rounds of
safeopt's time minus torch's; a least-squares line through (tensors, added cost) gives the fixed
cost (intercept, µs a step) and the cost a tensor (slope, µs). The target of the GPU issue: at
most ~30 µs + ~0.3 µs a tensor. Writes ``<out>/fixed_cost.json`` and ``fixed_cost.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import safeopt

COUNTS = (1, 16, 64, 256)
IMPLS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "forloop": {"foreach": False}}


CLOCKS = {"thread": time.thread_time_ns, "wall": time.perf_counter_ns}


def _block(step: Callable[[], object], steps: int, clock: Callable[[], int]) -> float:
    """Microseconds a call of ``step``, over ``steps`` calls."""
    start = clock()
    for _ in range(steps):
        step()
    return (clock() - start) / steps / 1000


def measure(n: int, impl: str, rounds: int, clock: Callable[[], int]) -> dict[str, float]:
    gen = torch.Generator().manual_seed(n)
    values = [torch.randn(16, generator=gen) for _ in range(n)]
    grads = [torch.randn(16, generator=gen) for _ in range(n)]
    sides = {}
    for name, cls in (("torch", torch.optim.Adam), ("safeopt", safeopt.Adam)):
        params = [torch.nn.Parameter(v.clone()) for v in values]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt = cls(params, lr=1e-6, **IMPLS[impl])
        opt.step()  # state allocated before timing
        sides[name] = opt.step
    steps = max(2, 64 // n)  # blocks of about the same length at every count
    for warm_up in sides.values():
        _block(warm_up, steps, clock)
    torch_times, added = [], []
    for r in range(rounds):
        order = ("torch", "safeopt") if r % 2 == 0 else ("safeopt", "torch")
        t = {name: _block(sides[name], steps, clock) for name in order}
        torch_times.append(t["torch"])
        added.append(t["safeopt"] - t["torch"])
    return {
        "tensors": n,
        "torch_us": statistics.median(torch_times),
        "added_us": statistics.median(added),
    }


def fit(points: list[dict[str, float]]) -> tuple[float, float]:
    """Least-squares intercept and slope of added_us against tensors."""
    xs = [p["tensors"] for p in points]
    ys = [p["added_us"] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--clock", choices=list(CLOCKS), default="thread")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    impls = ["fused"] if args.quick else list(IMPLS)
    rounds = 100 if args.quick else args.rounds
    clock = CLOCKS[args.clock]
    start = time.perf_counter()
    results = {}
    lines = [
        "| implementation | tensors | torch step (µs) | added by safeopt (µs) |",
        "|---|---|---|---|",
    ]
    summary = ["| implementation | fixed (µs a step) | per tensor (µs) |", "|---|---|---|"]
    for impl in impls:
        points = [measure(n, impl, rounds, clock) for n in COUNTS]
        intercept, slope = fit(points)
        results[impl] = {"points": points, "fixed_us": intercept, "per_tensor_us": slope}
        lines += [f"| {impl} | {p['tensors']} | {p['torch_us']:.1f} | {p['added_us']:.1f} |" for p in points]
        summary.append(f"| {impl} | {intercept:.1f} | {slope:.2f} |")
        print(summary[-1], file=sys.stderr)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": args.threads,
        "rounds": rounds,
        "clock": args.clock,
        "quick": args.quick,
        "seconds": round(time.perf_counter() - start, 1),
    }
    text = "\n".join(summary) + "\n\n" + "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fixed_cost.json").write_text(
            json.dumps({"meta": meta, "results": results}, indent=1) + "\n"
        )
        (args.out / "fixed_cost.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
