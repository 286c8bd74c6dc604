"""Optimizer step time and memory: safeopt against torch.optim, same implementation, one process.

Usage:
    python benchmarks/bench_step.py            # full suite (CPU; CUDA too when present)
    python benchmarks/bench_step.py --quick    # a subset, under a minute on 2 CPU cores
    python benchmarks/bench_step.py --device cpu --out benchmarks/results
    python benchmarks/bench_step.py --rows     # lazy="rows" only (embedding table, grouped experts)

For every workload, optimizer (Adam, AdamW, SGD with momentum 0.9), implementation (forloop,
foreach, fused) and active fraction (100%, 50%, 10%, 0%; inactive made by zero grads or by
``freeze``), torch and safeopt optimizers step the *same* parameters and grads in interleaved
rounds (alternating which goes first). Each round times a few steps of each; the figure is the median over rounds of
``safeopt time / torch time``, torch stepping everything with the same grads (the baseline sits in
the same table as the ``torch ms`` column). Memory is the extra memory a step allocates beyond
the parameters, grads and state (CUDA: peak allocated; CPU: bytes allocated during the step,
from the profiler).

Writes ``<out>/results.json``, ``<out>/results.md`` and ``<out>/ratio_vs_active.png``
(``results-quick.*`` and ``ratio_vs_active-quick.png`` with ``--quick``, so a quick run never
overwrites the full results).

``lazy="rows"`` (see ``bench_rows``): a 1,000,000 x 64 embedding table and grouped experts
``[64, 512, 512]`` whose grads are dense with only some rows (experts) nonzero, safeopt with
``lazy="rows"`` against torch's dense step of the same implementation. Each step takes the next of
three grads with different random active rows, so rows reach different step counts. Written to
``<out>/rows.json``, ``<out>/rows.md`` and ``<out>/rows.png``; part of the full suite, alone with ``--rows``, and the
1%-active embedding with fused Adam in ``--quick``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the memory profiler is chatty otherwise
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import safeopt


# --------------------------------------------------------------------------- workloads
def _uniform(n: int, numel: int) -> Callable[[], list[nn.Parameter]]:
    def build() -> list[nn.Parameter]:
        return [nn.Parameter(torch.randn(numel)) for _ in range(n)]

    return build


def _gpt2_small() -> list[nn.Parameter]:
    """A GPT-2-small-shaped transformer from torch.nn, random init (~124M parameters, 148 tensors)."""
    d, layers, vocab, ctx = 768, 12, 50257, 1024
    model = nn.ModuleDict(
        {
            "wte": nn.Embedding(vocab, d),
            "wpe": nn.Embedding(ctx, d),
            "h": nn.ModuleList(
                nn.TransformerEncoderLayer(d, 12, 4 * d, activation="gelu", batch_first=True, norm_first=True)
                for _ in range(layers)
            ),
            "ln_f": nn.LayerNorm(d),
        }
    )
    return list(model.parameters())


WORKLOADS: dict[str, Callable[[], list[nn.Parameter]]] = {
    "100 tiny (0.2M)": _uniform(100, 2_000),
    "40 medium (5M)": _uniform(40, 125_000),
    "16 large (34M)": _uniform(16, 2_125_000),
    "GPT-2 small (124M)": _gpt2_small,
}

OPTIMIZERS: dict[str, tuple[type, type, dict]] = {
    "Adam": (torch.optim.Adam, safeopt.Adam, {"lr": 1e-3}),
    "AdamW": (torch.optim.AdamW, safeopt.AdamW, {"lr": 1e-3}),
    "SGD": (torch.optim.SGD, safeopt.SGD, {"lr": 1e-3, "momentum": 0.9}),
}
IMPLS = {"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
FRACTIONS = (1.0, 0.5, 0.1, 0.0)


@dataclasses.dataclass
class Row:
    device: str
    workload: str
    optimizer: str
    impl: str
    how: str  # "zero grads" or "freeze"
    active: float
    torch_ms: float
    safeopt_ms: float
    ratio: float
    extra_mb_torch: float
    extra_mb_safeopt: float


def _inactive(params: list[nn.Parameter], active: float) -> set[int]:
    """Indices of the tensors made inactive: the last ones, until (1 - active) of the elements."""
    total = sum(p.numel() for p in params)
    out: set[int] = set()
    idle = 0
    for i in reversed(range(len(params))):
        if idle >= (1 - active) * total - 1e-9:
            break
        out.add(i)
        idle += params[i].numel()
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(step: Callable[[], object], n: int, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    _sync(device)
    return (time.perf_counter() - start) / n


def _extra_memory_mb(step: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocated = sum(
        e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0 and not e.cpu_children
    )
    return allocated / 2**20


def measure(
    device: str,
    workload: str,
    opt_name: str,
    impl: str,
    how: str,
    active: float,
    params: list[nn.Parameter],
    rounds: int,
    steps: int,
) -> Row:
    torch_cls, safe_cls, kwargs = OPTIMIZERS[opt_name]
    kwargs = {**kwargs, **IMPLS[impl]}
    idle = _inactive(params, active)
    for i, p in enumerate(params):
        p.grad = torch.zeros_like(p) if (how == "zero grads" and i in idle) else torch.randn_like(p)
    ref, mine = torch_cls(params, **kwargs), safe_cls(params, **kwargs)
    if how == "freeze" and idle:
        mine.freeze([params[i] for i in idle])
    ref.step()
    mine.step()  # allocate state outside the timed region
    ratios, t_torch, t_mine = [], [], []
    for r in range(rounds):
        if r % 2:  # alternate who goes first, so neither always runs on a warmer cache
            b = _time(mine.step, steps, device)
            a = _time(ref.step, steps, device)
        else:
            a = _time(ref.step, steps, device)
            b = _time(mine.step, steps, device)
        ratios.append(b / a)
        t_torch.append(a)
        t_mine.append(b)
    row = Row(
        device,
        workload,
        opt_name,
        impl,
        how,
        active,
        statistics.median(t_torch) * 1e3,
        statistics.median(t_mine) * 1e3,
        statistics.median(ratios),
        _extra_memory_mb(ref.step, device),
        _extra_memory_mb(mine.step, device),
    )
    del ref, mine
    for p in params:
        p.grad = None
    return row


def plan(quick: bool, device: str) -> Iterator[tuple[str, str, str, str, float]]:
    workloads = ["100 tiny (0.2M)", "40 medium (5M)"] if quick else list(WORKLOADS)
    for workload in workloads:
        opts = ["Adam", "SGD"] if quick else list(OPTIMIZERS)
        for opt_name in opts:
            impls = ["foreach", "fused"] if quick else list(IMPLS)
            for impl in impls:
                if quick and opt_name == "SGD" and impl == "fused":
                    continue
                for how in ("zero grads", "freeze"):
                    for active in (1.0, 0.5, 0.0) if quick else FRACTIONS:
                        if how == "freeze" and active == 1.0:
                            continue  # identical to "zero grads" at 100%
                        yield workload, opt_name, impl, how, active


def _progress(items: list, desc: str) -> Iterator:
    try:
        from tqdm import tqdm
    except ImportError:  # a plain bar on stderr
        for i, item in enumerate(items, 1):
            filled = int(30 * i / len(items))
            print(f"\r{desc} [{'#' * filled}{'.' * (30 - filled)}] {i}/{len(items)}", end="", file=sys.stderr)
            yield item
        print(file=sys.stderr)
        return
    yield from tqdm(items, desc=desc)


def _table(intro: str, header: list[str], cells: Iterator[list[str]]) -> str:
    """A paragraph, then a markdown table with ``header`` and one row per item of ``cells``."""
    lines = [intro, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def _shared_cells(r: Row, ms: str) -> tuple[list[str], list[str]]:
    """The cells both tables have: who stepped what, then the times, ratio and memory."""
    timing = [
        f"{r.torch_ms:{ms}}",
        f"{r.safeopt_ms:{ms}}",
        f"**{r.ratio:.2f}**",
        f"{r.extra_mb_torch:.1f}",
        f"{r.extra_mb_safeopt:.1f}",
    ]
    return [r.device, r.workload, r.optimizer, r.impl], timing


TIMING_HEADER = ["torch ms", "safeopt ms", "ratio", "extra MB torch", "extra MB safeopt"]


def markdown(rows: list[Row], meta: dict) -> str:
    def cells() -> Iterator[list[str]]:
        for r in rows:
            who, timing = _shared_cells(r, ".3f")
            yield [*who, r.how, f"{r.active:.0%}", *timing]

    return _table(
        f"Measured {meta['date']} on {meta['machine']}; torch {meta['torch']}; {meta['threads']} threads.",
        ["device", "workload", "optimizer", "impl", "inactive by", "active", *TIMING_HEADER],
        cells(),
    )


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')", file=sys.stderr)
        return None
    return plt


COLOURS = dict(zip(OPTIMIZERS, ("tab:blue", "tab:orange", "tab:green")))


def _meta(devices: list[str], quick: bool, rounds: int) -> dict[str, Any]:
    """Where and how a run was measured: written next to its rows."""
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name()}" if "cuda" in devices else ""),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quick": quick,
        "rounds": rounds,
    }


def plot(rows: list[Row], path: Path) -> bool:
    """One panel per (implementation, workload); colour = optimizer, line style = how inactive."""
    plt = _pyplot()
    if plt is None:
        return False
    workloads = list(dict.fromkeys(r.workload for r in rows))
    impls = list(dict.fromkeys(r.impl for r in rows))
    styles = {"zero grads": "-", "freeze": "--"}
    fig, axes = plt.subplots(
        len(impls),
        len(workloads),
        figsize=(3.6 * len(workloads), 2.6 * len(impls)),
        squeeze=False,
        sharex=True,
    )
    for (i, impl), (j, workload) in ((x, y) for x in enumerate(impls) for y in enumerate(workloads)):
        ax = axes[i][j]
        series: dict[tuple[str, str, str], list[Row]] = {}
        for r in rows:
            if r.workload == workload and r.impl == impl:
                series.setdefault((r.device, r.optimizer, r.how), []).append(r)
        for (device, opt_name, how), rs in series.items():
            rs = sorted(rs, key=lambda r: r.active)
            ax.plot(
                [r.active * 100 for r in rs],
                [r.ratio for r in rs],
                marker="o",
                markersize=3,
                color=COLOURS[opt_name],
                linestyle=styles[how],
                linewidth=1,
                label=f"{opt_name}, {how}" + (f" ({device})" if len({r.device for r in rows}) > 1 else ""),
            )
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"{workload}, {impl}", fontsize=9)
        ax.grid(alpha=0.3)
        if i == len(impls) - 1:
            ax.set_xlabel("active parameters (%)")
        if j == 0:
            ax.set_ylabel("safeopt / torch time")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    return True


# --------------------------------------------------------------------------- lazy="rows"
def _embedding() -> list[nn.Parameter]:
    return [nn.Parameter(torch.randn(1_000_000, 64))]


def _experts() -> list[nn.Parameter]:
    return [nn.Parameter(torch.randn(64, 512, 512))]


# workload -> (build, fractions of rows active, what a row is)
ROWS_WORKLOADS: dict[str, tuple[Callable[[], list[nn.Parameter]], tuple[float, ...]]] = {
    "embedding 1M x 64": (_embedding, (0.01, 0.1, 1.0)),
    "experts 64 x 512 x 512": (_experts, (0.125, 0.875, 1.0)),
}
ROWS_CASES = [
    ("Adam", "fused"),
    ("Adam", "foreach"),
    ("Adam", "forloop"),
    ("SGD", "fused"),
    ("SGD", "foreach"),
]


def _row_grads(p: nn.Parameter, active: float, n: int = 3) -> list[torch.Tensor]:
    """``n`` dense grads, each with a different random ``active`` fraction of rows nonzero."""
    out = []
    for _ in range(n):
        grad = torch.zeros_like(p)
        rows = torch.randperm(p.shape[0], device=p.device)[: max(1, round(active * p.shape[0]))]
        grad[rows] = torch.randn((len(rows), *p.shape[1:]), device=p.device)
        out.append(grad)
    return out


def bench_rows(device: str, quick: bool, rounds: int) -> list[Row]:
    """lazy="rows" against torch's dense step, same implementation; ``Row.how`` is "rows"."""
    rows: list[Row] = []
    todo = [
        (workload, opt_name, impl, active)
        for workload, (_, fractions) in ROWS_WORKLOADS.items()
        for opt_name, impl in ROWS_CASES
        for active in fractions
        if not quick
        or (workload.startswith("embedding") and opt_name == "Adam" and impl == "fused" and active == 0.01)
    ]
    built: dict[str, list[nn.Parameter]] = {}
    for workload, opt_name, impl, active in _progress(todo, f"{device} rows"):
        if workload not in built:
            built.clear()
            torch.manual_seed(0)
            with torch.device(device):
                built[workload] = ROWS_WORKLOADS[workload][0]()
        (p,) = built[workload]
        grads = _row_grads(p, active)
        torch_cls, safe_cls, kwargs = OPTIMIZERS[opt_name]
        kwargs = {**kwargs, **IMPLS[impl]}
        ref, mine = torch_cls([p], **kwargs), safe_cls([p], **kwargs, lazy="rows")
        turn = [0]

        def stepper(
            opt: torch.optim.Optimizer, p: nn.Parameter, grads: list[torch.Tensor]
        ) -> Callable[[], None]:
            def step() -> None:
                p.grad = grads[turn[0] % len(grads)]
                turn[0] += 1
                opt.step()

            return step

        ref_step, mine_step = stepper(ref, p, grads), stepper(mine, p, grads)
        for _ in range(len(grads)):  # state allocation and row counts outside the timed region
            ref_step()
            mine_step()
        steps = 3
        ratios, t_torch, t_mine = [], [], []
        for r in range(rounds):
            if r % 2:
                b = _time(mine_step, steps, device)
                a = _time(ref_step, steps, device)
            else:
                a = _time(ref_step, steps, device)
                b = _time(mine_step, steps, device)
            ratios.append(b / a)
            t_torch.append(a)
            t_mine.append(b)
        rows.append(
            Row(
                device,
                workload,
                opt_name,
                impl,
                "rows",
                active,
                statistics.median(t_torch) * 1e3,
                statistics.median(t_mine) * 1e3,
                statistics.median(ratios),
                _extra_memory_mb(ref_step, device),
                _extra_memory_mb(mine_step, device),
            )
        )
        del ref, mine, grads
        p.grad = None
    return rows


def run_rows(out: Path, devices: list[str], quick: bool, rounds: int) -> None:
    """bench_rows on every device; writes ``<out>/rows.json`` and ``rows.md`` (``rows-quick.*`` with quick)."""
    rows = [r for device in devices for r in bench_rows(device, quick, rounds)]
    meta = _meta(devices, quick, rounds)
    path = out / ("rows-quick.json" if quick else "rows.json")
    path.write_text(json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
    table = rows_markdown(rows, meta)
    path.with_suffix(".md").write_text(table)
    plot_rows(rows, path.with_suffix(".png"))
    print(table)


def plot_rows(rows: list[Row], path: Path) -> bool:
    """One panel per workload: ratio against the fraction of rows active, a line per optimizer and impl."""
    plt = _pyplot()
    if plt is None:
        return False
    from matplotlib import ticker

    workloads = list(dict.fromkeys(r.workload for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.2 * len(workloads), 3.2), squeeze=False)
    styles = {"fused": "-", "foreach": "--", "forloop": ":"}
    for ax, workload in zip(axes[0], workloads):
        fractions = sorted({r.active for r in rows if r.workload == workload})  # evenly spaced on x
        series: dict[tuple[str, str, str], list[Row]] = {}
        for r in rows:
            if r.workload == workload:
                series.setdefault((r.device, r.optimizer, r.impl), []).append(r)
        for (device, opt_name, impl), rs in series.items():
            rs = sorted(rs, key=lambda r: r.active)
            ax.plot(
                [fractions.index(r.active) for r in rs],
                [r.ratio for r in rs],
                marker="o",
                markersize=3,
                color=COLOURS[opt_name],
                linestyle=styles[impl],
                linewidth=1,
                label=f"{opt_name} {impl}" + (f" ({device})" if len({r.device for r in rows}) > 1 else ""),
            )
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(fractions)), [f"{f:.1%}" for f in fractions])
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(workload, fontsize=9)
        ax.set_xlabel("rows active")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel('lazy="rows" / torch dense time')
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    return True


def rows_markdown(rows: list[Row], meta: dict) -> str:
    def cells() -> Iterator[list[str]]:
        for r in rows:
            who, timing = _shared_cells(r, ".2f")
            yield [*who, f"{r.active:.1%}", *timing]

    return _table(
        f"Measured {meta['date']} on {meta['machine']}; torch {meta['torch']}; {meta['rounds']} rounds. "
        'safeopt with lazy="rows" against torch\'s dense step, same implementation.',
        ["device", "workload", "optimizer", "impl", "rows active", *TIMING_HEADER],
        cells(),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a subset that finishes in under a minute")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], action="append", help="default: cpu, and cuda if present"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved A/B rounds (default 7, quick 5)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--replot", action="store_true", help="redraw table and plot from <out>/results.json")
    parser.add_argument("--rows", action="store_true", help='only the lazy="rows" workloads')
    args = parser.parse_args(argv)
    if args.replot:
        saved = json.loads((args.out / "results.json").read_text())
        rows = [Row(**r) for r in saved["rows"]]
        (args.out / "results.md").write_text(markdown(rows, saved["meta"]))
        plot(rows, args.out / "ratio_vs_active.png")
        if (args.out / "rows.json").exists():
            saved = json.loads((args.out / "rows.json").read_text())
            rows = [Row(**r) for r in saved["rows"]]
            (args.out / "rows.md").write_text(rows_markdown(rows, saved["meta"]))
            plot_rows(rows, args.out / "rows.png")
        return 0
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rounds = args.rounds or (5 if args.quick else 7)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.rows:
        run_rows(args.out, devices, quick=False, rounds=rounds)
        return 0

    rows: list[Row] = []
    for device in devices:
        todo = list(plan(args.quick, device))
        built: dict[str, list[nn.Parameter]] = {}
        for workload, opt_name, impl, how, active in _progress(todo, f"{device}"):
            if workload not in built:
                built.clear()
                torch.manual_seed(0)
                with torch.device(device):
                    built[workload] = WORKLOADS[workload]()
            params = built[workload]
            steps = max(1, min(100, int(2e7 / sum(p.numel() for p in params))))  # rounds of >= ~20 ms
            rows.append(measure(device, workload, opt_name, impl, how, active, params, rounds, steps))

    meta = _meta(devices, args.quick, rounds)
    suffix = "-quick" if args.quick else ""  # a quick run never overwrites the full results
    (args.out / f"results{suffix}.json").write_text(
        json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1)
    )
    table = markdown(rows, meta)
    (args.out / f"results{suffix}.md").write_text(table)
    plot(rows, args.out / f"ratio_vs_active{suffix}.png")
    print(table)
    run_rows(args.out, devices, quick=args.quick, rounds=rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
