"""What ``python -m safeopt watch`` adds to a step: the global watch against the unwatched step.

The same optimizer, parameters and grads are stepped with and without the global watch
(``safeopt/_observe.py``: torch's global step hooks and a ``Watch`` per optimizer), in interleaved
rounds in one process; each round times a block of steps of each; the table gives the fastest
round of each (load from other work only adds time) and the JSON the medians too. Cases:
parameter sets of tiny and larger tensors, with every grad nonzero (the watch only looks) and
with half the parameters' grads all zero (the watch copies those before the step and compares
after it), for ``torch.optim.AdamW`` (foreach, the default on a GPU; forloop on the CPU by
default) and SGD with momentum. The copy made in a step is freed after it; the watch keeps one
tensor per parameter that moved while idle.

Usage:
    python benchmarks/bench_watch.py            # writes benchmarks/results/watch.{json,md}
    python benchmarks/bench_watch.py --quick    # fewer rounds, to watch-quick.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safeopt._observe import GlobalWatch  # the checkout's safeopt, not an installed one

RESULTS = ROOT / "benchmarks" / "results"

WORKLOADS = {
    "100 x 2,000": [(2_000,)] * 100,
    "12 x 512x512 + 12 x 512": [(512, 512)] * 12 + [(512,)] * 12,
}
OPTIMIZERS = {
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01),
    "SGD momentum": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9),
}


def setup(
    shapes: list[tuple[int, ...]], idle: float, make
) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(shape)) for shape in shapes]
    every = round(1 / idle) if idle else 0  # idle tensors spread out: 0.5 is every other one
    for i, p in enumerate(params):
        p.grad = torch.zeros_like(p) if every and i % every == 0 else torch.randn_like(p) * 1e-3
    return make(params), params


def block(opt: torch.optim.Optimizer, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - start) / steps


def measure(shapes, idle: float, make, rounds: int, steps: int) -> dict[str, float]:
    plain, _ = setup(shapes, idle, make)
    watched, _ = setup(shapes, idle, make)
    watch = GlobalWatch()
    block(plain, 2)  # state made, first-step costs paid, outside the timing
    watch.start()
    try:
        block(watched, 2)
    finally:
        watch.stop()
    times: dict[str, list[float]] = {"plain": [], "watched": []}
    for _ in range(rounds):
        times["plain"].append(block(plain, steps))
        watch.start()
        try:
            times["watched"].append(block(watched, steps))
        finally:
            watch.stop()
    # The fastest round of each: on a machine shared with other work, load only ever adds time.
    plain_s, watched_s = min(times["plain"]), min(times["watched"])
    return {
        "plain_ms": plain_s * 1e3,
        "watched_ms": watched_s * 1e3,
        "added_us": (watched_s - plain_s) * 1e6,
        "ratio": watched_s / plain_s,
        "plain_median_ms": statistics.median(times["plain"]) * 1e3,
        "watched_median_ms": statistics.median(times["watched"]) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds; writes watch-quick.*")
    args = parser.parse_args()
    rounds, steps = (3, 5) if args.quick else (15, 5)
    rows = []
    for workload, shapes in WORKLOADS.items():
        for name, make in OPTIMIZERS.items():
            for idle in (0.0, 0.5):
                row = {"workload": workload, "optimizer": name, "idle": idle}
                row.update(measure(shapes, idle, make, rounds, steps))
                rows.append(row)
                print(
                    f"{workload:>26}  {name:<12}  idle {idle:.0%}:  {row['plain_ms']:8.3f} ms  "
                    f"watched {row['watched_ms']:8.3f} ms  +{row['added_us']:9.1f} us  x{row['ratio']:.2f}",
                    flush=True,
                )
    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "rounds": rounds,
        "steps_per_round": steps,
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d"),
        "note": "shared machine, 2 CPU cores under load from other work: ratios are indicative",
    }
    stem = "watch-quick" if args.quick else "watch"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [
        "# Global watch: time per optimizer step, watched against unwatched",
        "",
        (
            f"`python benchmarks/bench_watch.py{' --quick' if args.quick else ''}`; torch {meta['torch']}, "
            f"CPU, {meta['threads']} threads, {meta['date']}; fastest of {rounds} interleaved rounds of "
            f"{steps} steps each. Measured on a shared machine (2 cores, loaded by other work): indicative."
        ),
        "",
        "| parameters | optimizer | grads all zero | step | watched step | added per step | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['optimizer']} | {r['idle']:.0%} of the tensors | {r['plain_ms']:.3f} ms "
            f"| {r['watched_ms']:.3f} ms | {r['added_us']:.0f} µs | {r['ratio']:.2f} |"
        )
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / stem}.json and .md")


if __name__ == "__main__":
    main()
