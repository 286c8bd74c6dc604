"""The prepared GPU check: the CUDA tests, then the GPU step benchmark; results into $OUT.

Usage, on a machine with CUDA, from the repository root (no install needed):

    PYTHONPATH=. python benchmarks/gpu_check.py              # tests + benchmark, a few minutes
    PYTHONPATH=. python benchmarks/gpu_check.py --bench-only # the benchmark alone
    PYTHONPATH=. python benchmarks/gpu_check.py --smoke      # tiny shapes; runs on the CPU too

Writes ``gpu_check.json`` and ``gpu_check.md`` (and ``tests.log``, ``tests.xml``) into ``$OUT``
when it is set, else into ``benchmarks/results/``.

Benchmark: the 148 parameter tensors of GPT-2 small (124M parameters), fp32 and bf16; every
parameter active, or the last 6 of the 12 blocks with all-zero grads; for foreach, fused,
fused+capturable and a CUDA graph replaying a captured fused+capturable step. Each figure is the
ratio safeopt / torch with the same arguments, torch stepping every parameter with the same grads,
timed with CUDA events over interleaved rounds in one process (median of the per-round ratios).
"Syncs" is the number of host synchronisations one safeopt step makes (torch's sync debug mode);
"launches / reads" the aten ops that are not views and the host reads of one step of each side
(``safeopt._bench.count_launches``; a graph replay is one graph launch with the captured step's
kernels in it, so it is counted as the eager capturable step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch

import safeopt
from safeopt._bench import count_launches

ROOT = Path(__file__).resolve().parents[1]
TESTS = [
    "tests/test_cuda.py",
    "tests/test_capturable.py",
    "tests/test_properties.py",
    "tests/test_launches.py",
]


def gpt2_shapes(
    width: int = 768, blocks: int = 12, vocab: int = 50257, context: int = 1024
) -> list[tuple[int, ...]]:
    """GPT-2's parameter tensors, in the order of its state_dict."""
    block = [
        (width,),
        (width,),
        (width, 3 * width),
        (3 * width,),
        (width, width),
        (width,),
        (width,),
        (width,),
        (width, 4 * width),
        (4 * width,),
        (4 * width, width),
        (width,),
    ]
    return [(vocab, width), (context, width), *[s for _ in range(blocks) for s in block], (width,), (width,)]


IMPLS: dict[str, dict[str, Any]] = {
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "fused+capturable": {"fused": True, "capturable": True},
    "graph": {"fused": True, "capturable": True},
}


class Workload:
    """Parameters and grads for one optimizer; ``idle`` tensors get all-zero grads."""

    def __init__(
        self, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: str, idle: set[int]
    ) -> None:
        gen = torch.Generator(device=device).manual_seed(0)
        self.params = [
            torch.nn.Parameter(torch.randn(s, generator=gen, device=device).to(dtype)) for s in shapes
        ]
        for i, p in enumerate(self.params):
            p.grad = (
                torch.zeros_like(p)
                if i in idle
                else torch.randn(p.shape, generator=gen, device=device).to(dtype)
            )


def _stepper(opt: torch.optim.Optimizer, graph: bool, device: str) -> Callable[[], None]:
    opt.step()  # state allocation (and warm-up) outside the timing
    if not graph:
        return opt.step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        opt.step()
    return g.replay


def _time(run: Callable[[], None], steps: int, device: str) -> float:
    """Seconds per step over ``steps`` steps."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(steps):
            run()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    return (time.perf_counter() - t0) / steps


def _syncs(opt: torch.optim.Optimizer, device: str) -> int | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def measure(
    shapes: list[tuple[int, ...]],
    dtype: torch.dtype,
    impl: str,
    idle: set[int],
    device: str,
    rounds: int,
    steps: int,
) -> dict[str, Any]:
    kwargs = {"lr": 1e-4, "weight_decay": 0.1, **IMPLS[impl]}
    graph = impl == "graph"
    ours, theirs = Workload(shapes, dtype, device, idle), Workload(shapes, dtype, device, idle)
    safe_opt = safeopt.AdamW(ours.params, **kwargs)
    torch_opt = torch.optim.AdamW(theirs.params, **kwargs)
    safe_opt.step()  # state allocation outside the count
    syncs = None if graph else _syncs(safe_opt, device)
    torch_opt.step()
    counted = {"safeopt": count_launches(safe_opt.step), "torch": count_launches(torch_opt.step)}
    runs = {"safeopt": _stepper(safe_opt, graph, device), "torch": _stepper(torch_opt, graph, device)}
    ratios: list[float] = []
    times: dict[str, list[float]] = {"safeopt": [], "torch": []}
    for r in range(rounds):
        order = ["safeopt", "torch"] if r % 2 else ["torch", "safeopt"]
        this = {who: _time(runs[who], steps, device) for who in order}
        for who, seconds in this.items():
            times[who].append(seconds)
        ratios.append(this["safeopt"] / this["torch"])
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "impl": impl,
        "idle_tensors": len(idle),
        "torch_ms": 1e3 * statistics.median(times["torch"]),
        "safeopt_ms": 1e3 * statistics.median(times["safeopt"]),
        "ratio": statistics.median(ratios),
        "syncs_per_step": syncs,
        **{f"{who}_launches": c.launches for who, c in counted.items()},
        **{f"{who}_reads": c.reads for who, c in counted.items()},
    }


def benchmark(smoke: bool) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if smoke:
        shapes, rounds, steps = gpt2_shapes(width=32, blocks=2, vocab=100, context=16), 3, 5
    else:
        shapes, rounds, steps = gpt2_shapes(), 7, 20
    per_block = 12
    blocks = (len(shapes) - 4) // per_block
    half = set(range(2 + per_block * (blocks // 2), 2 + per_block * blocks))  # the last half of the blocks
    impls = [i for i in IMPLS if device == "cuda" or i not in ("graph", "foreach")]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for impl in impls:
            for idle in (set(), half):
                rows.append(measure(shapes, dtype, impl, idle, device, rounds, steps))
                print(json.dumps(rows[-1]), flush=True)
    return {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "tensors": len(shapes),
        "parameters": sum(torch.Size(s).numel() for s in shapes),
        "smoke": smoke,
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        (
            f"GPU step benchmark, {result['date']}, {result['device']}, torch {result['torch']}: "
            f"{result['tensors']} tensors, {result['parameters'] / 1e6:.1f}M parameters (AdamW)."
        ),
        "",
        (
            "| dtype | impl | idle tensors | torch ms | safeopt ms | ratio | syncs/step | "
            "launches / reads torch | safeopt |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        syncs = "-" if row["syncs_per_step"] is None else str(row["syncs_per_step"])
        lines.append(
            f"| {row['dtype']} | {row['impl']} | {row['idle_tensors']} | {row['torch_ms']:.3f} | "
            f"{row['safeopt_ms']:.3f} | {row['ratio']:.2f} | {syncs} | "
            f"{row['torch_launches']} / {row['torch_reads']} | {row['safeopt_launches']} / {row['safeopt_reads']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench-only", action="store_true", help="skip the CUDA tests")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few rounds (works on the CPU)")
    args = parser.parse_args(argv)
    out = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    status = 0
    if not args.bench_only:
        env = {**os.environ, "CI": "true", "PYTHONPATH": str(ROOT)}
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            *TESTS,
            "-k",
            "cuda or Cuda or capturable or Capturable or DeviceDecision",
            f"--junitxml={out / 'tests.xml'}",
        ]
        with open(out / "tests.log", "w") as log:
            status = subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False
            ).returncode
        print(f"CUDA tests: exit {status} (log in {out / 'tests.log'})", flush=True)
    result = benchmark(args.smoke)
    result["tests_exit_status"] = None if args.bench_only else status
    name = "gpu_check-smoke" if args.smoke else "gpu_check"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
