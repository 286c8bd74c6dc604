"""Sparse embedding gradients: safeopt's ``lazy="rows"`` against torch's dense Adam and SparseAdam.

Usage:
    python benchmarks/bench_sparse.py                 # 1,000,000 x 64 fp32 table, 1% of rows a step
    python benchmarks/bench_sparse.py --rounds 11 --threads 2
    python benchmarks/bench_sparse.py --quick         # a 100,000-row table, a few seconds
    python benchmarks/bench_sparse.py --replot        # tables again from the saved JSON

One table, one sparse COO gradient per step as ``nn.Embedding(sparse=True)`` makes it (the
touched rows in lookup order, not coalesced), three such grads with different random rows taken
in turn, so rows reach different step counts. Every optimizer steps its own copy of the same
table with the same grads:

- ``torch Adam fused (dense)``: ``torch.optim.Adam(fused=True)`` with the grad densified once
  beforehand (what a dense ``nn.Embedding`` gives), moving every row; the baseline of the first
  target.
- ``torch SparseAdam``: ``torch.optim.SparseAdam`` with the sparse grad; the baseline of the second.
- ``safeopt Adam rows``: ``safeopt.Adam(lazy="rows", fused=True)`` with the sparse grad.
- ``safeopt Adam rows + wd + amsgrad``: the same with ``weight_decay=0.01, amsgrad=True`` (what
  SparseAdam cannot do).
- ``safeopt Adam rows (dense grad)``: ``lazy="rows"`` with the densified grad (the row check
  reads the whole grad), for comparison.

Timing: ``torch.utils.benchmark.Timer.blocked_autorange`` per optimizer, the optimizers
interleaved within each round (the order rotating), ``--rounds`` rounds in one process. Ratios
are taken within a round and the median (and range) over rounds is reported, so slow phases of
a shared machine hit both sides of a ratio. Memory: the optimizer's state, and the bytes its
step allocates (every tensor an operator returns that is not a view, summed, from a
``TorchDispatchMode``).

Writes ``<out>/sparse.json`` and ``<out>/sparse.md`` (``sparse-quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.benchmark import Timer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import safeopt

DENSE = "torch Adam fused (dense)"
SPARSE_ADAM = "torch SparseAdam"
ROWS = "safeopt Adam rows"
ROWS_MORE = "safeopt Adam rows + wd + amsgrad"
ROWS_DENSE = "safeopt Adam rows (dense grad)"
# name -> (baseline it is compared with, target ratio or None)
TARGETS: dict[str, list[tuple[str, float | None]]] = {
    ROWS: [(DENSE, 0.20), (SPARSE_ADAM, 0.60)],
    ROWS_MORE: [(DENSE, None), (SPARSE_ADAM, None)],
    ROWS_DENSE: [(DENSE, None)],
    SPARSE_ADAM: [(DENSE, None)],
}


def make_grads(n: int, width: int, touched: int, count: int, seed: int = 0) -> list[Tensor]:
    """Sparse grads as an embedding lookup makes them: ``touched`` distinct rows in lookup order."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(count):
        rows = torch.randperm(n, generator=gen)[:touched]
        values = torch.randn(touched, width, generator=gen)
        grads.append(torch.sparse_coo_tensor(rows[None], values, (n, width), check_invariants=False))
    return grads


class Stepper:
    """One optimizer over its own copy of the table, stepping through the grads in turn."""

    def __init__(self, name: str, start: Tensor, grads: list[Tensor], dense: list[Tensor]) -> None:
        self.name = name
        self.table = nn.Parameter(start.clone())
        self.grads = dense if name in (DENSE, ROWS_DENSE) else grads
        self.opt = self._make()
        self.i = 0

    def _make(self) -> torch.optim.Optimizer:
        params = [self.table]
        if self.name == DENSE:
            return torch.optim.Adam(params, lr=1e-3, fused=True)
        if self.name == SPARSE_ADAM:
            return torch.optim.SparseAdam(params, lr=1e-3)
        if self.name == ROWS_MORE:
            return safeopt.Adam(params, lr=1e-3, fused=True, weight_decay=0.01, amsgrad=True, lazy="rows")
        return safeopt.Adam(params, lr=1e-3, fused=True, lazy="rows")

    def step(self) -> None:
        self.table.grad = self.grads[self.i % len(self.grads)]
        self.i += 1
        self.opt.step()

    def state_bytes(self) -> int:
        return sum(
            t.nbytes for state in self.opt.state.values() for t in state.values() if isinstance(t, Tensor)
        )


_VIEWS = {
    "detach",
    "alias",
    "view",
    "_reshape_alias",
    "as_strided",
    "slice",
    "select",
    "split",
    "split_with_sizes",
    "expand",
    "unsqueeze",
    "squeeze",
    "t",
    "transpose",
    "permute",
    "_indices",
    "_values",
    "indices",
    "values",
    "view_as_real",
}


class _Allocated(TorchDispatchMode):
    """Sums the bytes of every tensor an operator returns that is none of its inputs nor a view."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ not in _VIEWS:
            inputs = {id(t) for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, Tensor) and id(t) not in inputs and t.layout is torch.strided:
                    self.bytes += t.nbytes
        return out


def step_allocates(stepper: Stepper) -> int:
    with _Allocated() as seen:
        stepper.step()
    return seen.bytes


def measure(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, width = args.table_rows, args.width
    touched = max(1, round(n * args.touched))
    grads = make_grads(n, width, touched, 3)
    start = torch.randn(n, width)
    names = [DENSE, SPARSE_ADAM, ROWS, ROWS_MORE, ROWS_DENSE]
    dense = [g.coalesce().to_dense() for g in grads]  # densified once, shared by the dense steps
    steppers = {name: Stepper(name, start, grads, dense) for name in names}
    del start
    for stepper in steppers.values():  # state, row_step, and rows with different step counts
        for _ in range(3):
            stepper.step()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            timer = Timer("s.step()", globals={"s": steppers[name]}, num_threads=torch.get_num_threads())
            times[name].append(timer.blocked_autorange(min_run_time=args.min_run_time).median)
        print(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{k} {v[-1] * 1e3:.2f} ms" for k, v in times.items()),
            file=sys.stderr,
        )
    rows = []
    for name in names:
        row: dict[str, Any] = {
            "optimizer": name,
            "ms": statistics.median(times[name]) * 1e3,
            "ms_range": [min(times[name]) * 1e3, max(times[name]) * 1e3],
            "state_mb": steppers[name].state_bytes() / 2**20,
            "step_alloc_mb": step_allocates(steppers[name]) / 2**20,
            "ratios": [],
        }
        for base, target in TARGETS.get(name, []):
            per_round = [a / b for a, b in zip(times[name], times[base])]
            row["ratios"].append(
                {
                    "vs": base,
                    "median": statistics.median(per_round),
                    "min": min(per_round),
                    "max": max(per_round),
                    "target": target,
                }
            )
        rows.append(row)
    return {
        "meta": {
            "date": datetime.date.today().isoformat(),
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "table": [n, width],
            "touched_rows": touched,
            "rounds": args.rounds,
            "min_run_time": args.min_run_time,
            "quick": args.quick,
            "command": "python benchmarks/bench_sparse.py " + " ".join(args.argv),
        },
        "rows": rows,
    }


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    n, width = meta["table"]
    lines = [
        (
            f"Measured {meta['date']} on {meta['machine']}, {meta['threads']} threads; torch {meta['torch']}; "
            f"table {n:,} x {width} float32, {meta['touched_rows']:,} rows touched a step; "
            f"{meta['rounds']} interleaved rounds. Command: `{meta['command']}`."
        ),
        "",
        "| optimizer | grad | ms (median) | ms (range) | state MB | allocated a step MB |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        grad = "dense" if row["optimizer"] in (DENSE, ROWS_DENSE) else "sparse"
        lo, hi = row["ms_range"]
        lines.append(
            f"| {row['optimizer']} | {grad} | {row['ms']:.2f} | {lo:.2f} to {hi:.2f} | "
            f"{row['state_mb']:.1f} | {row['step_alloc_mb']:.1f} |"
        )
    lines += [
        "",
        "| optimizer | against | ratio (median) | range over rounds | target |",
        "|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        for ratio in row["ratios"]:
            target = "" if ratio["target"] is None else f"≤ {ratio['target']:.2f}"
            if ratio["target"] is not None:
                target += " (met)" if ratio["median"] <= ratio["target"] else " (not met)"
            lines.append(
                f"| {row['optimizer']} | {ratio['vs']} | **{ratio['median']:.2f}** | "
                f"{ratio['min']:.2f} to {ratio['max']:.2f} | {target} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table-rows", type=int, default=1_000_000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--touched", type=float, default=0.01, help="share of the rows a step touches")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per blocked_autorange")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="a 100,000-row table, 3 short rounds")
    parser.add_argument("--replot", action="store_true", help="write the markdown again from the JSON")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    args.argv = argv
    stem = "sparse-quick" if args.quick else "sparse"
    if args.replot:
        results = json.loads((args.out / f"{stem}.json").read_text())
    else:
        if args.quick:
            args.table_rows, args.rounds, args.min_run_time = 100_000, 3, 0.1
        results = measure(args)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
