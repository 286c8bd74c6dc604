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
counted; ``--clock wall`` for ``perf_counter_ns``). The added cost at a count is the median over
rounds of safeopt's time minus torch's, with its standard error (1.2533 x the rounds' spread, the
median absolute deviation x 1.4826, over the square root of the rounds).

A line through (tensors, added cost) gives the fixed cost (intercept, µs a step) and the cost a
tensor (slope, µs), fitted two ways, both reported from the same run:

- weighted least squares, each point weighted by one over its squared standard error (the
  estimator the summary leads with). The noise of a round is mostly the noise of torch's own
  step, which grows with the count: at 256 tensors torch's forloop step is about 5.7 ms, and 1%
  of it is 57 µs, more than the whole fixed cost; at 1 tensor it is about 40 µs. An unweighted
  fit lets the 256-tensor point, the noisiest, set the intercept almost alone (the intercept of
  an unweighted line through 1, 16, 64 and 256 is mostly an extrapolation from the large
  counts); weighting by the measured precision of each point is the minimum-variance linear
  estimate when the points are independent, and gives each estimate a standard error, printed
  beside it.
- ordinary least squares, unweighted (the estimator of earlier runs, kept for comparison).

The raw points (the median added cost, its standard error and torch's step at every count) are
in the tables and the JSON. The target of the GPU issue: at most ~30 µs + ~0.3 µs a tensor.
Writes ``<out>/fixed_cost.json`` and ``fixed_cost.md``.
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
    median = statistics.median(added)
    spread = 1.4826 * statistics.median(abs(a - median) for a in added)  # robust standard deviation
    return {
        "tensors": n,
        "torch_us": statistics.median(torch_times),
        "added_us": median,
        "added_se_us": max(1.2533 * spread / rounds**0.5, 1e-3),  # standard error of the median
    }


def fit(points: list[dict[str, float]], *, weighted: bool) -> dict[str, float]:
    """Intercept and slope of added_us against tensors, with their standard errors: weighted by one
    over each point's squared standard error, or unweighted (standard errors from the residuals)."""
    xs = [p["tensors"] for p in points]
    ys = [p["added_us"] for p in points]
    ws = [1 / p["added_se_us"] ** 2 if weighted else 1.0 for p in points]
    sw = sum(ws)
    mx = sum(w * x for w, x in zip(ws, xs)) / sw
    my = sum(w * y for w, y in zip(ws, ys)) / sw
    sxx = sum(w * (x - mx) ** 2 for w, x in zip(ws, xs))
    slope = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys)) / sxx
    intercept = my - slope * mx
    # Weighted: the weights are the points' precisions. Unweighted: the residuals' variance.
    scale = 1.0
    if not weighted:
        scale = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys)) / max(len(xs) - 2, 1)
    return {
        "fixed_us": intercept,
        "fixed_se_us": (scale * (1 / sw + mx**2 / sxx)) ** 0.5,
        "per_tensor_us": slope,
        "per_tensor_se_us": (scale / sxx) ** 0.5,
    }


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
        "| implementation | tensors | torch step (µs) | added by safeopt (µs) | its standard error (µs) |",
        "|---|---|---|---|---|",
    ]
    summary = [
        (
            "| implementation | fixed (µs a step), weighted | per tensor (µs), weighted "
            "| fixed, unweighted | per tensor, unweighted |"
        ),
        "|---|---|---|---|---|",
    ]
    for impl in impls:
        points = [measure(n, impl, rounds, clock) for n in COUNTS]
        wls, ols = fit(points, weighted=True), fit(points, weighted=False)
        results[impl] = {"points": points, "weighted": wls, "unweighted": ols}
        lines += [
            f"| {impl} | {p['tensors']} | {p['torch_us']:.1f} | {p['added_us']:.1f} | {p['added_se_us']:.1f} |"
            for p in points
        ]
        summary.append(
            f"| {impl} | {wls['fixed_us']:.1f} ± {wls['fixed_se_us']:.1f} "
            f"| {wls['per_tensor_us']:.2f} ± {wls['per_tensor_se_us']:.2f} "
            f"| {ols['fixed_us']:.1f} ± {ols['fixed_se_us']:.1f} "
            f"| {ols['per_tensor_us']:.2f} ± {ols['per_tensor_se_us']:.2f} |"
        )
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
