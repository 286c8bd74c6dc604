"""torch.compile(opt.step) with a changing active set: how often dynamo compiles, and the step time.

Usage:
    python benchmarks/bench_compile.py                      # compiled for real with inductor
    python benchmarks/bench_compile.py --backend eager      # dynamo's graphs only (fast)
    python benchmarks/bench_compile.py --tensors 16 --steps 20 --out benchmarks/results

AdamW over ``--tensors`` parameters of ``--numel`` elements; each of ``--steps`` steps gives a
random half of them (at least one) a nonzero grad and the rest all-zero grads, as a mixture of
experts with changing idle experts does. torch's optimizer steps every parameter (torch's rule);
safeopt's steps the active ones. The step is ``torch.compile(opt.step, backend=...)``; a counting
backend records each graph dynamo hands it (a compilation or recompilation). Then the time of a
step, each side compiled, all active and half idle: the best of ``--repeats`` means of ``--steps``
steps, and safeopt's over torch's. Writes ``<out>/compile.json`` and ``compile.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import safeopt

IMPLS: dict[str, dict[str, Any]] = {
    "forloop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "fused+capturable": {"fused": True, "capturable": True},
}


def run(cls: type, impl: str, args: argparse.Namespace) -> dict[str, Any]:
    tensors, steps, backend, numel = args.tensors, args.steps, args.backend, args.numel
    torch._dynamo.reset()
    graphs = [0]
    compiler: Any = backend
    if backend == "eager":

        def compiler(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
            graphs[0] += 1
            return gm.forward

    else:
        inner = backend

        def compiler(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
            graphs[0] += 1
            from torch._dynamo.backends.registry import lookup_backend

            return lookup_backend(inner)(gm, example_inputs)

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(numel, generator=gen)) for _ in range(tensors)]
    opt = cls(params, lr=1e-3, **IMPLS[impl])
    step = torch.compile(opt.step, backend=compiler)
    rng = random.Random(0)

    def grads(active: set[int]) -> None:
        for i, p in enumerate(params):
            p.grad = torch.randn(numel, generator=gen) if i in active else torch.zeros(numel)

    for _ in range(steps):
        grads({i for i in range(tensors) if rng.random() < 0.5} or {0})
        step()
    row: dict[str, Any] = {"graphs": graphs[0]}
    for name, active in (("all_active", set(range(tensors))), ("half_idle", set(range(tensors // 2)))):
        grads(active)
        step()
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            best = min(best, (time.perf_counter() - t0) / steps * 1e6)
        row[f"{name}_us"] = best
    row["graphs_after"] = graphs[0]  # the timed steps compiled nothing more when equal to graphs
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--numel", type=int, default=4096, help="elements of each parameter")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--impls", nargs="+", choices=list(IMPLS), default=list(IMPLS))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows = []
    for impl in args.impls:
        for name, cls in (("torch", torch.optim.AdamW), ("safeopt", safeopt.AdamW)):
            rows.append({"impl": impl, "optimizer": name, **run(cls, impl, args)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    torch_rows = {r["impl"]: r for r in rows if r["optimizer"] == "torch"}
    title = (
        f"{args.backend} backend, {args.tensors} tensors of {args.numel} elements, best of "
        f"{args.repeats} means of {args.steps} steps\n"
    )
    header = (
        f"| impl | optimizer | graphs over {args.steps} steps | all active µs | half idle µs "
        "| all active / torch | half idle / torch |"
    )
    lines = [title, header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        base = torch_rows[r["impl"]]
        lines.append(
            f"| {r['impl']} | {r['optimizer']} | {r['graphs']} | {r['all_active_us']:.0f} "
            f"| {r['half_idle_us']:.0f} | {r['all_active_us'] / base['all_active_us']:.2f} "
            f"| {r['half_idle_us'] / base['half_idle_us']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "machine": f"CPU ({platform.machine()}), 1 thread",
        "backend": args.backend,
        "tensors": args.tensors,
        "numel": args.numel,
        "steps": args.steps,
        "repeats": args.repeats,
        "load": "shared machine: 2 cores, several other jobs running",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (args.out / "compile.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
