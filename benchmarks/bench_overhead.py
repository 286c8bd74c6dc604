"""Step overhead with every parameter active: safeopt's step time over torch's, same implementation.

Usage:
    python benchmarks/bench_overhead.py            # every workload, optimizer and implementation
    python benchmarks/bench_overhead.py --quick    # the tiny and medium workloads, Adam and SGD
    python benchmarks/bench_overhead.py --device cpu --rounds 7 --min-run-time 0.5 --out benchmarks/results

For each workload of ``catalogue.py`` (many tiny tensors, where a per-parameter cost shows, up to a
GPT-2-small-shaped model), optimizer (Adam, AdamW, SGD with momentum 0.9) and implementation
(forloop, foreach, fused), ``safeopt.bench`` steps copies of the parameters with torch and with
the safeopt twin, same grads, in interleaved rounds timed by ``torch.utils.benchmark``. Writes
``<out>/overhead.json`` and ``overhead.md`` (``overhead-quick.*`` with ``--quick``) and prints
``Compare``'s table.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torch.utils.benchmark import Compare

import safeopt
from benchmarks import catalogue, report

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
                    label = f"{workload}, {device}"
                    print(f"{label}: {name} {impl}", file=sys.stderr)
                    result = safeopt.bench(params, catalogue.optimizer(name, impl), label=label, **options)
                    rows += [report.Row.of(r, device, workload, name, impl) for r in result.rows]
                    measured += [(r.torch, r.safeopt) for r in result.rows]
            del params
    info = report.meta(devices, args.quick, options["rounds"], time.perf_counter() - start, workloads)
    path = report.save(args.out, "overhead", rows, info)
    print(Compare([m for pair in measured for m in pair]))
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
