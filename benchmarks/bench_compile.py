"""torch.compile(opt.step) with a changing active set: how often dynamo compiles, and the step time.

Usage:
    python benchmarks/bench_compile.py                      # dynamo's graphs counted, eager backend
    python benchmarks/bench_compile.py --backend inductor   # compiled for real (slow on the CPU)
    python benchmarks/bench_compile.py --tensors 16 --steps 20 --out benchmarks/results

AdamW over ``--tensors`` parameters of 16 elements; each of ``--steps`` steps gives a random half
of them (at least one) a nonzero grad and the rest all-zero grads, as a mixture of experts with
changing idle experts does. torch's optimizer steps every parameter (torch's rule); safeopt's
steps the active ones. The step is ``torch.compile(opt.step, backend=...)``; a counting backend
records each graph dynamo hands it (a compilation or recompilation). Then the mean time of
``--steps`` more steps, each side compiled, all active and half idle. Writes
``<out>/compile.json`` and ``compile.md``.
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
    "fused": {"fused": True},
    "foreach": {"foreach": True},
    "fused+capturable": {"fused": True, "capturable": True},
}


def run(cls: type, impl: str, tensors: int, steps: int, backend: str) -> dict[str, Any]:
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
    params = [torch.nn.Parameter(torch.randn(16, generator=gen)) for _ in range(tensors)]
    opt = cls(params, lr=1e-3, **IMPLS[impl])
    step = torch.compile(opt.step, backend=compiler)
    rng = random.Random(0)

    def grads(active: set[int]) -> None:
        for i, p in enumerate(params):
            p.grad = torch.randn(16, generator=gen) if i in active else torch.zeros(16)

    for _ in range(steps):
        grads({i for i in range(tensors) if rng.random() < 0.5} or {0})
        step()
    row: dict[str, Any] = {"graphs": graphs[0]}
    for name, active in (("all_active", set(range(tensors))), ("half_idle", set(range(tensors // 2)))):
        grads(active)
        step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        row[f"{name}_us"] = (time.perf_counter() - t0) / steps * 1e6
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--backend", default="eager")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows = []
    for impl in IMPLS:
        for name, cls in (("torch", torch.optim.AdamW), ("safeopt", safeopt.AdamW)):
            rows.append(
                {"impl": impl, "optimizer": name, **run(cls, impl, args.tensors, args.steps, args.backend)}
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    lines = [
        f"| impl | optimizer | graphs over {args.steps} steps | all active µs | half idle µs |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['impl']} | {r['optimizer']} | {r['graphs']} | {r['all_active_us']:.0f} | {r['half_idle_us']:.0f} |"
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "machine": f"CPU ({platform.machine()}), 1 thread",
        "backend": args.backend,
        "tensors": args.tensors,
        "steps": args.steps,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (args.out / "compile.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
