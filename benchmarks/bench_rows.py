"""Row-lazy mode: ``lazy="rows"`` against torch's dense step of the same implementation.

Usage:
    python benchmarks/bench_rows.py            # both tables, Adam (fused, foreach, forloop), SGD (fused, foreach)
    python benchmarks/bench_rows.py --quick    # the 1%-active embedding with fused Adam

Workloads (``catalogue.ROW_WORKLOADS``): a 1,000,000 x 64 embedding table and grouped experts
``[64, 512, 512]``, whose grads are dense with only some rows (experts) nonzero. ``safeopt.bench``
with ``idle_by="rows"`` gives each step the next of three grads with different random active
rows, so rows reach different step counts, and builds the safeopt twin with ``lazy="rows"``.
Writes ``<out>/rows.json``, ``rows.md`` and ``rows.png`` (``rows-quick.*`` with ``--quick``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torch.utils.benchmark import Compare

import safeopt
from benchmarks import catalogue, report

CASES = [("Adam", "fused"), ("Adam", "foreach"), ("Adam", "forloop"), ("SGD", "fused"), ("SGD", "foreach")]


def main(argv: list[str] | None = None) -> int:
    args = report.parser(__doc__).parse_args(argv)
    devices, options = report.settings(args)
    workloads = report.chosen(args, list(catalogue.ROW_WORKLOADS), ["embedding 1M x 64"])
    start, rows, measured = time.perf_counter(), [], []
    for device in devices:
        for workload in workloads:
            make, shares = catalogue.ROW_WORKLOADS[workload]
            params = catalogue.build(make, device)
            for name, impl in CASES[:1] if args.quick else CASES:
                label = f"{workload}, {device}"
                print(f"{label}: {name} {impl}", file=sys.stderr)
                idle = [1 - s for s in (shares[:1] if args.quick else shares)]
                result = safeopt.bench(
                    params, catalogue.optimizer(name, impl), idle=idle, idle_by="rows", label=label, **options
                )
                rows += [report.Row.of(r, device, workload, name, impl) for r in result.rows]
                measured += [(r.torch, r.safeopt) for r in result.rows]
            del params
    info = report.meta(devices, args.quick, options["rounds"], time.perf_counter() - start, workloads)
    path = report.save(args.out, "rows", rows, info)
    print(Compare([m for pair in measured for m in pair]))
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
