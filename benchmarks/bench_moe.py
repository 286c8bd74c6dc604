"""Fused experts: ``lazy="rows"`` against torch's AdamW (foreach and fused) on MoE-shaped parameters.

Usage:
    python benchmarks/bench_moe.py            # 0%, 25%, 50% and 75% of the experts idle, foreach and fused
    python benchmarks/bench_moe.py --quick    # the same, short rounds

Workload (``catalogue.MOE_WORKLOADS``): one MoE layer's fused experts as transformers 5 keeps them,
64 experts, ``gate_up_proj [64, 512, 256]`` and ``down_proj [64, 256, 256]``, sized for a CPU.
``safeopt.bench`` with ``idle_by="rows"`` gives each step the next of three grads, each with a
different random set of idle experts (all-zero slices), so experts reach different step counts:
each idle expert is skipped, each active one is stepped in place as a view (an expert is 512 KB
and 256 KB of contiguous memory), and with every expert active the whole tensor takes torch's
step. Writes ``<out>/moe.json`` and ``moe.md`` (``moe-quick.*`` with ``--quick``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torch.utils.benchmark import Compare

import safeopt
from benchmarks import catalogue, report

CASES = [("AdamW", "foreach"), ("AdamW", "fused")]


def main(argv: list[str] | None = None) -> int:
    args = report.parser(__doc__).parse_args(argv)
    devices, options = report.settings(args)
    workloads = report.chosen(args, list(catalogue.MOE_WORKLOADS), list(catalogue.MOE_WORKLOADS))
    start, rows, measured = time.perf_counter(), [], []
    for device in devices:
        for workload in workloads:
            make, idle = catalogue.MOE_WORKLOADS[workload]
            params = catalogue.build(make, device)
            for name, impl in CASES:
                label = f"{workload}, {device}"
                print(f"{label}: {name} {impl}", file=sys.stderr)
                result = safeopt.bench(
                    params,
                    catalogue.optimizer(name, impl),
                    idle=list(idle),
                    idle_by="rows",
                    label=label,
                    **options,
                )
                rows += [report.Row.of(r, device, workload, name, impl) for r in result.rows]
                measured += [(r.torch, r.safeopt) for r in result.rows]
            del params
    info = report.meta(devices, args.quick, options["rounds"], time.perf_counter() - start, workloads)
    path = report.save(args.out, "moe", rows, info)
    print(Compare([m for pair in measured for m in pair]))
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
