"""What ``safeopt.watch`` adds to a step: torch's AdamW on fused experts, watched and not.

Usage:
    python benchmarks/bench_watch_rows.py             # foreach and fused, 0%, 25% and 75% of the experts idle
    python benchmarks/bench_watch_rows.py --quick     # short rounds

The watch reads every grad of two or more dimensions once more (the row check of ``lazy="rows"``)
to find idle slices, copies those slices before the step, compares them after it and adds up the
moves of the ones that moved (with torch's AdamW and weight decay: all of them). Workload: one MoE
layer's fused experts (``catalogue.MOE_WORKLOADS``), each step the next of three grads with
different random idle experts. Ratio: watched time / unwatched time, median of interleaved rounds.
Writes ``<out>/watch_rows.json`` and ``watch_rows.md`` (``watch_rows-quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from torch.utils.benchmark import Timer

import safeopt
from benchmarks import catalogue

RESULTS = Path(__file__).resolve().parent / "results"
IDLE = (0.0, 0.25, 0.75)


def grads(params: list[torch.nn.Parameter], idle: float) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(3):
        step = []
        for p in params:
            g = torch.randn(p.shape, generator=gen)
            g[torch.randperm(p.shape[0], generator=gen)[: round(idle * p.shape[0])]] = 0.0
            step.append(g)
        out.append(step)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 7)
    (workload,) = catalogue.MOE_WORKLOADS
    make, _ = catalogue.MOE_WORKLOADS[workload]
    rows = []
    for impl in ("foreach", "fused"):
        for idle in IDLE:
            params = catalogue.build(make, "cpu")
            sets = grads(params, idle)
            opts = {
                "plain": catalogue.optimizer("AdamW", impl)(params),
                "watched": catalogue.optimizer("AdamW", impl)(params),
            }
            w = safeopt.watch(opts["watched"])
            count = [0]

            def step(opt: torch.optim.Optimizer, params: list = params, sets: list = sets) -> None:
                for p, g in zip(params, sets[count[0] % 3]):
                    p.grad = g
                count[0] += 1
                opt.step()

            times: dict[str, list[float]] = {"plain": [], "watched": []}
            for r in range(rounds):
                for name in ("plain", "watched") if r % 2 == 0 else ("watched", "plain"):
                    timer = Timer("step(opt)", globals={"step": step, "opt": opts[name]})
                    times[name].append(timer.timeit(2 if args.quick else 5).median * 1e3)
            w.remove()
            plain, watched = statistics.median(times["plain"]), statistics.median(times["watched"])
            ratios = [b / a for a, b in zip(times["plain"], times["watched"])]
            rows.append(
                {
                    "impl": impl,
                    "idle": idle,
                    "plain_ms": plain,
                    "watched_ms": watched,
                    "ratio": statistics.median(ratios),
                }
            )
            print(f"AdamW {impl}, {idle:.0%} idle: {plain:.1f} ms, watched {watched:.1f} ms", file=sys.stderr)
            del params, sets, opts, w
    info = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "quick": args.quick,
        "rounds": rounds,
        "workload": workload,
    }
    stem = "watch_rows-quick" if args.quick else "watch_rows"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": info, "rows": rows}, indent=1) + "\n")
    lines = [
        (
            f"Measured {info['date']} on {info['machine']}; torch {info['torch']}; median of {rounds} "
            f"interleaved rounds. torch.optim.AdamW (weight decay 0.01) on {workload}, watched by "
            "safeopt.watch and not; each step the next of three grads with different random idle experts."
        ),
        "",
        "| impl | experts idle | step ms | watched ms | ratio |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['impl']} | {r['idle']:.0%} | {r['plain_ms']:.1f} | {r['watched_ms']:.1f} | **{r['ratio']:.2f}** |"
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
