"""What one step asks of an accelerator, counted on the CPU: kernel launches, host reads, host time.

Usage:
    python benchmarks/bench_launches.py                       # the table, into benchmarks/results
    python benchmarks/bench_launches.py --quick               # fewer timing rounds
    python benchmarks/bench_launches.py --out DIR --width 768 # another folder; GPT-2's real widths

GPT-2 small's 148 parameter tensors (AdamW, fp32), at a width of 8 by default: the launch and read
counts depend on the number of tensors, not their sizes, and tiny tensors leave the host time a step
spends issuing its work (Python and dispatch), which is what an accelerator waits for. For each
implementation (fused, foreach, fused+capturable), every tensor active or the last 6 of the 12
blocks with all-zero grads, torch's step and safeopt's twin with the same arguments:

- launches: the aten ops of one step that are not views (each at least one kernel launch on a GPU);
  reads: reads of tensor data on the host (``_local_scalar_dense``, ``Tensor.tolist``), each a
  synchronisation on a GPU (``safeopt._bench.count_launches``);
- host time: torch's and safeopt's step timed in one process, one thread, over many short rounds
  (a block of a few steps of each, the order alternating round by round) by the thread's CPU
  clock (``time.thread_time_ns``: time waiting for a core shared with other jobs is not counted;
  ``--clock wall`` for ``perf_counter_ns``); the ratio is the median of the per-round ratios.

The eager rows decide as on an accelerator (the private ``safeopt._rule.FORCE_DEVICE``: no host
probe of CPU grads; the device kernels and reads an accelerator step runs). A CUDA graph of the
capturable step replays its launches with no host work; ``benchmarks/gpu_check.py`` measures that on
a GPU. Writes ``<out>/launches.json`` and ``launches.md``.
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
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import safeopt
from safeopt import _rule
from safeopt._bench import count_launches

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import gpt2_shapes

IMPLS: dict[str, dict[str, Any]] = {
    "fused": {"fused": True},
    "foreach": {"foreach": True},
    "fused+capturable": {"fused": True, "capturable": True},
}
RESULTS = Path(__file__).resolve().parent / "results"


def _optimizer(cls: type, shapes: list[tuple[int, ...]], impl: str, idle: set[int]) -> torch.optim.Optimizer:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for i, p in enumerate(params):
        p.grad = torch.zeros_like(p) if i in idle else torch.randn(p.shape, generator=gen)
    opt = cls(params, lr=1e-6, weight_decay=0.01, **IMPLS[impl])
    opt.step()  # state allocated before counting and timing
    return opt  # type: ignore[no-any-return]  # torch.optim.AdamW or safeopt.AdamW


CLOCKS = {"thread": time.thread_time_ns, "wall": time.perf_counter_ns}
BLOCK = 4  # steps a timed block


def _block(step: Callable[[], Any], clock: Callable[[], int]) -> float:
    """Seconds a call of ``step``, over a block of calls."""
    start = clock()
    for _ in range(BLOCK):
        step()
    return (clock() - start) / BLOCK / 1e9


def measure(
    shapes: list[tuple[int, ...]], impl: str, idle: set[int], rounds: int, clock: Callable[[], int]
) -> dict[str, Any]:
    sides = {
        "torch": _optimizer(torch.optim.AdamW, shapes, impl, idle),
        "safeopt": _optimizer(safeopt.AdamW, shapes, impl, idle),
    }
    row: dict[str, Any] = {"impl": impl, "tensors": len(shapes), "idle_tensors": len(idle)}
    for name, opt in sides.items():
        counted = count_launches(opt.step)
        row[f"{name}_launches"], row[f"{name}_reads"] = counted.launches, counted.reads
        row[f"{name}_ops"] = counted.ops
    times: dict[str, list[float]] = {"torch": [], "safeopt": []}
    for opt in sides.values():  # warm-up
        _block(opt.step, clock)
    for r in range(rounds):
        for name in ("torch", "safeopt") if r % 2 == 0 else ("safeopt", "torch"):
            times[name].append(_block(sides[name].step, clock))
    row["torch_us"] = statistics.median(times["torch"]) * 1e6
    row["safeopt_us"] = statistics.median(times["safeopt"]) * 1e6
    row["ratio"] = statistics.median(s / t for s, t in zip(times["safeopt"], times["torch"]))
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        (
            "| step | idle tensors | torch launches / reads | safeopt launches / reads | "
            "torch host µs | safeopt host µs | ratio |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['impl']} | {r['idle_tensors']} of {r['tensors']} | {r['torch_launches']} / {r['torch_reads']} | "
            f"{r['safeopt_launches']} / {r['safeopt_reads']} | {r['torch_us']:.0f} | {r['safeopt_us']:.0f} | "
            f"**{r['ratio']:.2f}** |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--clock", choices=list(CLOCKS), default="thread")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rounds = 40 if args.quick else args.rounds
    clock = CLOCKS[args.clock]
    width = args.width
    shapes = gpt2_shapes(
        width=width, vocab=50257 if width == 768 else 8 * width, context=1024 if width == 768 else 2 * width
    )
    half_idle = set(range(2 + 6 * 12, 2 + 12 * 12))  # the last 6 of the 12 blocks
    start = time.perf_counter()
    rows = []
    for impl in IMPLS:
        for idle in (set(), half_idle):
            _rule.FORCE_DEVICE = impl != "fused+capturable"
            try:
                rows.append(measure(shapes, impl, idle, rounds, clock))
            finally:
                _rule.FORCE_DEVICE = False
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "machine": f"CPU ({platform.machine()}), 1 thread",
        "width": width,
        "rounds": rounds,
        "clock": args.clock,
        "quick": args.quick,
        "seconds": round(time.perf_counter() - start, 1),
    }
    text = table(rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "launches-quick" if args.quick else "launches"
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
