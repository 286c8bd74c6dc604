"""Idle share: safeopt's step time over torch's when part of the model takes no part in the step.

Usage:
    python benchmarks/bench_idle.py            # every workload, optimizer and implementation
    python benchmarks/bench_idle.py --quick    # the tiny and medium workloads, Adam and SGD, 50% idle

For each workload of ``catalogue.py``, optimizer, implementation and share of active elements
(50% and 0%), the last tensors of the model, up to the inactive share, get no part in the step
either by **zero grads** (torch steps them, safeopt checks and skips them) or by **freeze** (grads
dense; safeopt skips them without looking). ``safeopt.bench`` times torch and the safeopt twin
interleaved with ``torch.utils.benchmark``. Writes ``<out>/idle.json``, ``idle.md`` and
``idle.png`` (``idle-quick.*`` with ``--quick``) and prints ``Compare``'s table.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torch.utils.benchmark import Compare

import safeopt
from benchmarks import catalogue, report

IDLE = (0.5, 1.0)

QUICK = ["100 tiny (0.2M)", "40 medium (5M)"]


def main(argv: list[str] | None = None) -> int:
    args = report.parser(__doc__).parse_args(argv)
    devices, options = report.settings(args)
    workloads = report.chosen(args, list(catalogue.WORKLOADS), QUICK)
    start, rows, measured = time.perf_counter(), [], []
    for device in devices:
        for workload in workloads:
            params = catalogue.build(catalogue.WORKLOADS[workload], device)
            for name in ("Adam", "SGD") if args.quick else catalogue.OPTIMIZERS:
                for impl in catalogue.IMPLS:
                    for idle_by in ("zero", "freeze"):
                        label = f"{workload}, {device}"
                        print(f"{label}: {name} {impl}, {idle_by}", file=sys.stderr)
                        result = safeopt.bench(
                            params,
                            catalogue.optimizer(name, impl),
                            idle=(0.5,) if args.quick else IDLE,
                            idle_by=idle_by,
                            label=label,
                            **options,
                        )
                        rows += [report.Row.of(r, device, workload, name, impl) for r in result.rows]
                        measured += [(r.torch, r.safeopt) for r in result.rows]
            del params
    info = report.meta(devices, args.quick, options["rounds"], time.perf_counter() - start, workloads)
    path = report.save(args.out, "idle", rows, info)
    print(Compare([m for pair in measured for m in pair]))
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
