"""``python -m safeopt demo``: the scenarios of ``safeopt/_scenarios.py`` as a table and a plot.

The plot needs matplotlib (``pip install "torch-safeopt[demo]"``); without it the table is printed and
the plot skipped, with a note.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from safeopt._scenarios import Result, run_all
from safeopt._watch import WatchReport

__all__ = ["check_out", "demo", "plot", "table"]


def table(results: Sequence[Result]) -> str:
    def cell(r: WatchReport) -> str:
        return f"{len(r.moved):>5}  {r.l2:>8.3g}  {r.max_abs:>8.3g}"

    width = max(len(r.scenario.name) for r in results)
    lines = [
        f"{'':<{width}}  {'':<9}  {'':>5}  {'idle':>6}  {'---- torch.optim ----':^25}  {'------ safeopt ------':^25}",
        f"{'scenario':<{width}}  {'optimizer':<9}  {'steps':>5}  {'params':>6}  "
        + "  ".join([f"{'moved':>5}  {'drift L2':>8}  {'max abs':>8}"] * 2),
    ]
    lines.append("-" * len(lines[-1]))
    for r in results:
        idle = f"{len(r.torch_report.params)}/{r.n_params}"
        lines.append(
            f"{r.scenario.name:<{width}}  {r.scenario.optimizer:<9}  {r.scenario.steps:>5}  {idle:>6}  "
            f"{cell(r.torch_report)}  {cell(r.safeopt_report)}"
        )
    lines += [
        "",
        "idle params: parameter tensors that had no gradient (None or all zero) in some step, of all.",
        "moved: how many of them the optimizer changed anyway in such a step (the ghost update);",
        "drift: the sum of those changes over the run, L2 norm and largest element.",
    ]
    return "\n".join(lines)


def plot(results: Sequence[Result], out: Path) -> None:
    """Drift of the idle parameters against the step, one panel per scenario (needs matplotlib)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 7.5), layout="constrained")
    axes = fig.subplots(2, 3).flatten()
    for ax, r in zip(axes, results):
        s = r.scenario
        steps = range(1, s.steps + 1)
        ax.plot(steps, r.torch_report.history, color="tab:red", label=f"torch.optim.{s.optimizer}")
        ax.plot(
            steps, r.safeopt_report.history, color="tab:blue", linestyle="--", label=f"safeopt.{s.optimizer}"
        )
        ax.set_title(f"{s.name}\nidle: {s.idle}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("drift without a gradient (L2)")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    for ax in axes[len(results) :]:
        ax.axis("off")
    axes[-1].text(
        0.0,
        0.5,
        "drift: the sum of the changes the optimizer made to\n"
        "parameters in steps where their grad was None or all\n"
        "zero, L2 norm over all of them, after each step.\n\n"
        "safeopt leaves such a parameter untouched: its line\n"
        "stays at 0.",
        transform=axes[-1].transAxes,
        fontsize=10,
        va="center",
    )
    fig.suptitle("How far parameters move in steps where they have no gradient")
    fig.savefig(out, dpi=100)


def check_out(out: Path) -> Path:
    """The file the plot goes to: ``out``, with ``.png`` added when it has no extension.

    Raises ValueError, before any work, when the folder is missing or not writable, ``out`` is a
    folder, or matplotlib (when installed) cannot write the extension.
    """
    if out.is_dir():
        raise ValueError(
            f"{str(out)!r} is a folder; give a file name, e.g. {str(out / 'safeopt-demo.png')!r}"
        )
    if not out.suffix:
        out = out.with_name(out.name + ".png")  # what matplotlib would write: say so up front
    folder = out.parent
    if not folder.is_dir():
        raise ValueError(f"{str(out)!r}: the folder {str(folder)!r} does not exist")
    if out.is_dir():
        raise ValueError(f"{str(out)!r} is a folder; give a file name")
    if not os.access(out if out.exists() else folder, os.W_OK):
        raise ValueError(f"{str(out)!r}: not writable")
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return out  # no plot will be written; demo() says so
    formats = FigureCanvasBase.get_supported_filetypes()
    if out.suffix[1:].lower() not in formats:
        raise ValueError(
            f"{str(out)!r}: matplotlib cannot write {out.suffix}; use one of .{', .'.join(sorted(formats))}"
        )
    return out


def demo(out: Path | None = Path("safeopt-demo.png")) -> int:
    """Run every scenario, print the table, write the plot to ``out`` (None: no plot).

    ``out`` is checked first (:func:`check_out`): a path it refuses raises ValueError before any
    scenario runs. Returns 0, or 1 if a safeopt optimizer moved a parameter that had no gradient.
    """
    if out is not None:
        out = check_out(out)
    start = time.perf_counter()
    results = run_all()
    print(table(results))
    if out is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                '\nplot skipped: matplotlib is not installed (pip install "torch-safeopt[demo]" or pip install matplotlib)'
            )
        else:
            plot(results, out)
            print(f"\nplot: {out}")
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0 if not any(r.safeopt_report for r in results) else 1
