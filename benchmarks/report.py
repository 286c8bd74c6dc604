"""Results of the benchmark suites: JSON, markdown tables and plots, and ``--replot``.

Usage:
    python benchmarks/report.py --replot     # rewrite every table and plot from benchmarks/results/*.json

Each suite (``bench_overhead.py``, ``bench_idle.py``, ``bench_rows.py``) writes
``<out>/<suite>.json`` (``meta`` and ``rows``) and the markdown table ``<suite>.md`` made from it,
plus a plot for some; a ``--quick`` run writes ``<suite>-quick.*`` and never overwrites a full run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"

#: Per suite: the columns that say what was measured; the timing columns follow.
COLUMNS = {
    "overhead": ["device", "workload", "optimizer", "impl"],
    "idle": ["device", "workload", "optimizer", "impl", "inactive by", "active"],
    "rows": ["device", "workload", "optimizer", "impl", "rows active"],
    "moe": ["device", "workload", "optimizer", "impl", "experts idle", "target"],
}
INTROS = {
    "overhead": "Every parameter active: what safeopt's decision costs on top of torch's step.",
    "idle": "Part of the model inactive (the last tensors, up to 1 - active of the elements), by zero "
    "grads (torch steps them, safeopt checks and skips them) or by freeze (grads dense).",
    "rows": 'safeopt with lazy="rows" against torch\'s dense step, same implementation; each step takes '
    "the next of three grads with different random active rows.",
    "moe": 'safeopt.AdamW with the experts in a lazy="rows" group against torch.optim.AdamW stepping '
    "every expert, same implementation; each step takes the next of three grads with different random "
    "idle experts. Target: at most 1.05 with every expert active, else at most the active share + 0.15.",
}
TIMING = ["torch ms", "safeopt ms", "ratio", "extra MB torch", "extra MB safeopt"]
COLOURS = {"Adam": "tab:blue", "AdamW": "tab:orange", "SGD": "tab:green"}


@dataclasses.dataclass
class Row:
    device: str
    workload: str
    optimizer: str
    impl: str
    how: str  # "zero grads", "freeze" or "rows"
    active: float
    torch_ms: float
    safeopt_ms: float
    ratio: float
    extra_mb_torch: float
    extra_mb_safeopt: float

    @classmethod
    def of(cls, r: Any, device: str, workload: str, optimizer: str, impl: str) -> Row:
        """A row from a ``safeopt.bench`` result row."""
        how = {"zero": "zero grads"}.get(r.idle_by, r.idle_by)
        return cls(
            device,
            workload,
            optimizer,
            impl,
            how,
            1 - r.idle,
            r.torch_ms,
            r.safeopt_ms,
            r.ratio,
            r.extra_mb_torch,
            r.extra_mb_safeopt,
        )


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every suite takes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a subset, short rounds (development)")
    p.add_argument(
        "--device", choices=["cpu", "cuda"], action="append", help="default: cpu, and cuda if present"
    )
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, quick 3)")
    p.add_argument(
        "--min-run-time", type=float, default=None, help="seconds timed per side (default 0.5, quick 0.1)"
    )
    p.add_argument("--workloads", nargs="+", metavar="NAME", help="only these workloads of catalogue.py")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p


def settings(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """The devices to run on and the keyword arguments for ``safeopt.bench``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rounds = args.rounds or (3 if args.quick else 7)
    min_run_time = args.min_run_time or (0.1 if args.quick else 0.5)
    return devices, {"rounds": rounds, "min_run_time": min_run_time, "verbose": False}


def chosen(args: argparse.Namespace, workloads: Sequence[str], quick: Sequence[str]) -> list[str]:
    """The workloads to run: ``--workloads``, else ``quick`` with ``--quick``, else all."""
    names = args.workloads or (quick if args.quick else workloads)
    unknown = set(names) - set(workloads)
    if unknown:
        raise SystemExit(f"unknown workloads {sorted(unknown)}; known: {list(workloads)}")
    return [w for w in workloads if w in names]


def meta(
    devices: Sequence[str], quick: bool, rounds: int, seconds: float, workloads: Sequence[str]
) -> dict[str, Any]:
    """Where and how a run was measured: written next to its rows."""
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name()}" if "cuda" in devices else ""),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quick": quick,
        "rounds": rounds,
        "seconds": round(seconds),
        "workloads": list(workloads),
    }


def markdown(suite: str, rows: list[Row], info: dict[str, Any]) -> str:
    """A paragraph saying where and how, then one table row per measurement."""
    ms = ".2f" if suite == "rows" else ".3f"
    intro = (
        f"Measured {info['date']} on {info['machine']}; torch {info['torch']}; median of {info['rounds']} "
        f"interleaved rounds. {INTROS[suite]}"
    )
    header = [*COLUMNS[suite], *TIMING]
    lines = [intro, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        who = [r.device, r.workload, r.optimizer, r.impl]
        if suite == "idle":
            who += [r.how, f"{r.active:.0%}"]
        elif suite == "rows":
            who += [f"{r.active:.1%}"]
        elif suite == "moe":
            target = 1.05 if r.active == 1 else r.active + 0.15
            who += [f"{1 - r.active:.0%}", f"{'met' if r.ratio <= target else 'not met'} (<= {target:.2f})"]
        timing = [
            f"{r.torch_ms:{ms}}",
            f"{r.safeopt_ms:{ms}}",
            f"**{r.ratio:.2f}**",
            f"{r.extra_mb_torch:.1f}",
            f"{r.extra_mb_safeopt:.1f}",
        ]
        lines.append("| " + " | ".join(who + timing) + " |")
    return "\n".join(lines) + "\n"


def save(out: Path, suite: str, rows: list[Row], info: dict[str, Any]) -> Path:
    """Write ``<suite>.json`` and its table (``<suite>-quick.*`` for a quick run) and the plot."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / (f"{suite}-quick.json" if info["quick"] else f"{suite}.json")
    path.write_text(
        json.dumps({"meta": info, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1) + "\n"
    )
    _render(path, suite)
    return path


def load(path: Path) -> tuple[list[Row], dict[str, Any]]:
    saved = json.loads(path.read_text())
    return [Row(**r) for r in saved["rows"]], saved["meta"]


def _render(path: Path, suite: str) -> None:
    rows, info = load(path)
    path.with_suffix(".md").write_text(markdown(suite, rows, info))
    if suite in PLOTS:
        PLOTS[suite](rows, path.with_suffix(".png"))


def replot(out: Path = RESULTS) -> list[Path]:
    """Rewrite the tables and plots of every full run's JSON in ``out``; returns the JSON files."""
    done = []
    for suite in COLUMNS:
        path = out / f"{suite}.json"
        if path.exists():
            _render(path, suite)
            done.append(path)
    return done


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


def plot_idle(rows: list[Row], path: Path) -> None:
    """One panel per (implementation, workload): ratio against the active share; line style = how."""
    plt = _pyplot()
    if plt is None:
        return
    workloads = list(dict.fromkeys(r.workload for r in rows))
    impls = list(dict.fromkeys(r.impl for r in rows))
    fig, axes = plt.subplots(
        len(impls),
        len(workloads),
        figsize=(3.6 * len(workloads), 2.6 * len(impls)),
        squeeze=False,
        sharex=True,
    )
    for i, impl in enumerate(impls):
        for j, workload in enumerate(workloads):
            ax = axes[i][j]
            series: dict[tuple[str, str], list[Row]] = {}
            for r in rows:
                if r.workload == workload and r.impl == impl:
                    series.setdefault((r.optimizer, r.how), []).append(r)
            for (name, how), rs in series.items():
                rs.sort(key=lambda r: r.active)
                ax.plot(
                    [r.active * 100 for r in rs],
                    [r.ratio for r in rs],
                    marker="o",
                    markersize=3,
                    color=COLOURS[name],
                    linestyle="-" if how == "zero grads" else "--",
                    linewidth=1,
                    label=f"{name}, {how}",
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
    plt.close(fig)


def plot_rows(rows: list[Row], path: Path) -> None:
    """One panel per workload: ratio against the share of rows active, a line per optimizer and impl."""
    plt = _pyplot()
    if plt is None:
        return
    workloads = list(dict.fromkeys(r.workload for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.2 * len(workloads), 3.2), squeeze=False)
    styles = {"fused": "-", "foreach": "--", "forloop": ":"}
    for ax, workload in zip(axes[0], workloads):
        shares = sorted({r.active for r in rows if r.workload == workload})  # evenly spaced on x
        series: dict[tuple[str, str], list[Row]] = {}
        for r in rows:
            if r.workload == workload:
                series.setdefault((r.optimizer, r.impl), []).append(r)
        for (name, impl), rs in series.items():
            rs.sort(key=lambda r: r.active)
            ax.plot(
                [shares.index(r.active) for r in rs],
                [r.ratio for r in rs],
                marker="o",
                markersize=3,
                color=COLOURS[name],
                linestyle=styles[impl],
                linewidth=1,
                label=f"{name} {impl}",
            )
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(shares)), [f"{s:.1%}" for s in shares])
        ax.set_title(workload, fontsize=9)
        ax.set_xlabel("rows active")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel('lazy="rows" / torch dense time')
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS = {"idle": plot_idle, "rows": plot_rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--replot", action="store_true", required=True, help="rewrite tables and plots from the JSON"
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    for path in replot(args.out):
        print(f"{path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
