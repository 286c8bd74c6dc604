"""``python -m safeopt``: the command line (``demo`` and ``bench``); the work is done elsewhere.

``demo``: the ghost update, measured with torch.optim and with safeopt, on the scenarios of
``safeopt/_scenarios.py`` (table and plot: ``safeopt/_demo.py``). ``bench``: safeopt's step time
against torch's on parameters of given shapes or on a model you name (``safeopt/_bench.py``).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safeopt._bench import bench
from safeopt._demo import demo

__all__ = ["main"]


def _optimizer(spec: str) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """``"AdamW(lr=1e-3, fused=True)"``: a torch.optim class and literal keyword arguments."""
    try:
        call = ast.parse(spec if "(" in spec else spec + "()", mode="eval").body
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
            raise ValueError
        cls = getattr(torch.optim, call.func.id)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg is not None}
    except (SyntaxError, ValueError, AttributeError):
        raise argparse.ArgumentTypeError(
            f"{spec!r}: expected a torch.optim class with literal keyword arguments, e.g. 'AdamW(lr=1e-3, fused=True)'"
        ) from None
    return lambda params: cls(params, **kwargs)


def _tensors(spec: str) -> tuple[int, tuple[int, ...]]:
    """``"100x2000"``: 100 tensors of 2,000 elements; ``"12x768x3072"``: 12 of 768 x 3072."""
    try:
        count, *shape = (int(n) for n in spec.lower().split("x"))
    except ValueError:
        count, shape = 0, []
    if count < 1 or not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected COUNTxD1[xD2...], e.g. 100x2000 or 12x768x3072")
    return count, tuple(shape)


def _model(spec: str) -> Any:
    """``"package.module:function"``: called with no arguments, it returns a module or its parameters."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected MODULE:FUNCTION, e.g. mypackage.models:build")
    return getattr(importlib.import_module(module), name)


def _bench(args: argparse.Namespace) -> int:
    with torch.device(args.device):
        if args.model is not None:
            model = args.model()
        else:
            model = [
                nn.Parameter(torch.randn(shape, dtype=args.dtype))
                for n, shape in args.tensors
                for _ in range(n)
            ]
    bench(
        model,
        args.optimizer,
        idle=args.idle,
        idle_by=args.idle_by,
        rounds=args.rounds,
        min_run_time=args.min_run_time,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="safeopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="show how far idle parameters drift under torch.optim and under safeopt")
    d.add_argument("--out", type=Path, default=Path("safeopt-demo.png"), help="where to write the plot (PNG)")
    d.add_argument("--no-plot", action="store_true", help="print the table only")
    b = sub.add_parser("bench", help="time safeopt's step against torch's, interleaved in one process")
    what = b.add_mutually_exclusive_group()
    what.add_argument(
        "--tensors",
        type=_tensors,
        action="append",
        metavar="COUNTxSHAPE",
        help="parameters to step, e.g. 100x2000 (repeatable; default 100x2000)",
    )
    what.add_argument(
        "--model",
        type=_model,
        metavar="MODULE:FUNCTION",
        help="a function returning your model (nn.Module) or its parameters",
    )
    b.add_argument(
        "--optimizer",
        type=_optimizer,
        default=_optimizer("AdamW"),
        metavar="'CLASS(KEY=VALUE, ...)'",
        help="a torch.optim class and its options (default AdamW)",
    )
    b.add_argument("--idle", type=float, nargs="+", default=[0.0, 0.5], help="fractions idle (default 0 0.5)")
    b.add_argument(
        "--idle-by",
        choices=["zero", "freeze", "rows"],
        default="zero",
        help="how the idle part gets no gradient (default zero grads)",
    )
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.add_argument("--dtype", type=lambda s: getattr(torch, s), default=torch.float32, help="for --tensors")
    b.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    b.add_argument("--min-run-time", type=float, default=1.0, help="seconds timed per side (default 1)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo(None if args.no_plot else args.out)
    if args.tensors is None:
        args.tensors = [_tensors("100x2000")]
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
