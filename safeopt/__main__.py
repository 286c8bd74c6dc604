"""``python -m safeopt`` and the ``safeopt`` command: ``demo``, ``bench``, ``watch`` and ``run``; the work
is done elsewhere.

``demo``: the ghost update, measured with torch.optim and with safeopt, on the scenarios of
``safeopt/_scenarios.py`` (table and plot: ``safeopt/_demo.py``). ``bench``: safeopt's step time
against torch's on parameters of given shapes or on a model you name (``safeopt/_bench.py``).
``watch SCRIPT [ARGS]``: runs a script as ``python SCRIPT ARGS`` would (``safeopt/_script.py``)
and reports the ghost updates of every optimizer that stepped (``safeopt/_observe.py``).
``run SCRIPT [ARGS]``: the same script with ``safeopt.patch()`` in force (``safeopt/_patch.py``).
Everything after SCRIPT (or ``-m MODULE``) is the script's, as with ``python``.

Errors follow argparse: a bad argument or environment (a module that does not import, CUDA asked
for without CUDA, a model function that raises) is one line on stderr and exit status 2; a
failure of the work itself one line and status 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import math
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safeopt import __version__
from safeopt._bench import bench
from safeopt._demo import check_out, demo
from safeopt._observe import GlobalWatch
from safeopt._patch import patch, unpatch
from safeopt._script import Target, flush_stdout
from safeopt._script import run as run_script

__all__ = ["main"]

DESCRIPTION = (
    "safeopt: torch.optim optimizers that never move a parameter that took no part in a step. "
    "'demo' shows how far parameters without a gradient drift under torch.optim and under safeopt; "
    "'bench' times safeopt's step against torch's on your shapes or your model; "
    "'watch' runs your training script unchanged and reports the parameters its optimizers moved "
    "without a gradient; 'run' runs it with torch.optim.Adam, AdamW and SGD replaced by safeopt's."
)
SCRIPT_COMMANDS = ("watch", "run")
SCRIPT_OPTIONS = {
    "--json": True,
    "--rows": True,
    "--debug": False,
    "--wrap-all": False,
    "-h": False,
    "--help": False,
}
DEBUG_HELP = "on an error, show the Python traceback"
TWINS = ("Adam", "AdamW", "SGD")  # the classes with a safeopt twin (lazy="rows" needs one)
BENCH_MEMORY = 6  # bench holds the parameters, their grads and two optimizers' state: about 6x for Adam


class _Optimizer:
    """``"AdamW(lr=1e-3, fused=True)"``: a torch.optim optimizer class and literal keyword arguments."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        example = "e.g. 'AdamW(lr=1e-3, fused=True)'"
        try:
            call = ast.parse(spec if "(" in spec else spec + "()", mode="eval").body
            if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
                raise ValueError
            self.kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg is not None}
        except (SyntaxError, ValueError):
            raise argparse.ArgumentTypeError(
                f"{spec!r}: expected a torch.optim class with literal keyword arguments, {example}"
            ) from None
        cls = getattr(torch.optim, call.func.id, None)
        if (
            not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer))
            or cls is torch.optim.Optimizer
        ):
            raise argparse.ArgumentTypeError(
                f"{spec!r}: {call.func.id} is not a torch.optim optimizer class, {example}"
            )
        self.cls: type[torch.optim.Optimizer] = cls

    def __call__(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return self.cls(params, **self.kwargs)


def _tensors(spec: str) -> tuple[int, tuple[int, ...]]:
    """``"100x2000"``: 100 tensors of 2,000 elements; ``"12x768x3072"``: 12 of 768 x 3072."""
    try:
        count, *shape = (int(n) for n in spec.lower().split("x"))
    except ValueError:
        count, shape = 0, []
    if count < 1 or not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected COUNTxD1[xD2...], e.g. 100x2000 or 12x768x3072")
    return count, tuple(shape)


def _model(spec: str) -> str:
    """``"package.module:function"``, checked for its form here; imported after parsing (``--debug``)."""
    module, _, name = spec.partition(":")
    if not module or not name or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"{spec!r}: expected MODULE:FUNCTION, e.g. mypackage.models:build")
    return spec


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # NaN too
        raise argparse.ArgumentTypeError(f"{text!r}: expected a fraction from 0 to 1, e.g. 0.5")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of at least 1")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number of seconds, e.g. 1")
    return value


def _dtype(text: str) -> torch.dtype:
    dtype = getattr(torch, text, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a floating point torch dtype, e.g. float32, bfloat16 or float16"
        )
    return dtype


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a torch device, e.g. cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"{text!r}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu"
        )
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {_first_line(e)}") from None
    return device


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _memory_bytes(device: torch.device) -> int | None:
    """Total memory of ``device`` (the machine's for the CPU); None when unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[1])
        if device.type == "cpu":
            return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, RuntimeError):
        return None
    return None


def _check_size(
    tensors: list[tuple[int, tuple[int, ...]]], dtype: torch.dtype, device: torch.device
) -> str | None:
    """An error message when the parameters asked for cannot fit, else None."""
    size = sum(count * math.prod(shape) for count, shape in tensors) * dtype.itemsize
    total = _memory_bytes(device)
    if total is not None and BENCH_MEMORY * size > total:
        spec = " ".join("x".join(map(str, (count, *shape))) for count, shape in tensors)
        return (
            f"argument --tensors: {spec}: {size / 2**30:.3g} GiB of parameters; bench needs about "
            f"{BENCH_MEMORY}x that (grads and two optimizers' state), more than the {total / 2**30:.3g} GiB "
            f"of {device.type}"
        )
    return None


def _load_model(spec: str) -> Callable[[], Any]:
    """Import MODULE from ``spec`` as ``python -m`` would (the current folder first) and get FUNCTION."""
    module_name, _, name = spec.partition(":")
    if not any(entry in ("", os.getcwd()) for entry in sys.path):
        # The console script puts its own folder first; ``python -m safeopt`` puts the current one.
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name + ".").startswith(e.name + "."):  # not what it imports
            raise _Usage(
                f"argument --model: {spec!r}: no module named {e.name!r} (run from the folder that holds it, "
                "or add that folder to PYTHONPATH)"
            ) from e
        raise _Usage(f"argument --model: {spec!r}: importing {module_name} failed: {_first_line(e)}") from e
    except Exception as e:
        raise _Usage(f"argument --model: {spec!r}: importing {module_name} failed: {_first_line(e)}") from e
    function = getattr(module, name, None)
    if not callable(function):
        raise _Usage(f"argument --model: {spec!r}: {module_name} has no function {name!r}")
    return function  # type: ignore[no-any-return]  # a callable found by name at run time


def _tensor_list(built: Any) -> list[torch.Tensor]:
    """``built`` as a list of tensors, or [] when it is not an iterable of tensors."""
    try:
        tensors = list(built)
    except TypeError:
        return []
    return tensors if all(isinstance(t, torch.Tensor) for t in tensors) else []


class _Usage(Exception):
    """A bad argument found after parsing: reported as argparse reports its own (status 2)."""


def _bench(args: argparse.Namespace) -> int:
    device: torch.device = args.device
    if args.model is None:
        message = _check_size(args.tensors, args.dtype, device)
        if message is not None:
            raise _Usage(message)
    if args.idle_by == "rows" and args.optimizer.cls.__name__ not in TWINS:
        raise _Usage(
            f"argument --idle-by: rows needs one of {', '.join(TWINS)} (the optimizers with a row-lazy "
            f"safeopt twin), not {args.optimizer.cls.__name__}"
        )
    try:  # the options, on a parameter of the device: a bad one is found before any work
        args.optimizer([nn.Parameter(torch.zeros(1, device=device))])
    except Exception as e:
        raise _Usage(f"argument --optimizer: {args.optimizer.spec!r}: {_first_line(e)}") from e
    model: nn.Module | list[torch.Tensor]
    if args.model is not None:
        function = _load_model(args.model)
        with torch.device(device):
            try:
                built = function()
            except Exception as e:
                raise _Usage(f"argument --model: {args.model}() raised {_first_line(e)}") from e
        model = built if isinstance(built, nn.Module) else _tensor_list(built)
        if not isinstance(model, nn.Module) and not model:
            raise _Usage(f"argument --model: {args.model}() must return an nn.Module or its parameters")
    else:
        with torch.device(device):
            model = [
                nn.Parameter(torch.randn(shape, dtype=args.dtype))
                for n, shape in args.tensors
                for _ in range(n)
            ]
    try:
        bench(
            model,
            args.optimizer,
            idle=args.idle,
            idle_by=args.idle_by,
            rounds=args.rounds,
            min_run_time=args.min_run_time,
        )
    except ValueError as e:  # bench()'s own check of what it was given
        raise _Usage(str(e)) from e
    return 0


def _split_script(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` cut where the script's own arguments start: (safeopt's, the script's).

    For ``watch`` and ``run``, the first argument that is not one of their options (or the one
    after ``-m``) is the script (the module), and everything after it is the script's, as
    ``python`` takes them: ``--json`` or ``-h`` there reach the script.
    """
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 1  # options before the command (--debug): they take no value
    if i >= len(argv) or argv[i] not in SCRIPT_COMMANDS:
        return argv, []
    i += 1
    while i < len(argv):
        token = argv[i]
        if token == "-m" or token.startswith("-m") and len(token) > 2:
            end = i + 2 if token == "-m" else i + 1
            return argv[:end], argv[end:]
        if token == "--":
            return argv[: i + 2], argv[i + 2 :]
        if not token.startswith("-") or token == "-":
            return argv[: i + 1], argv[i + 1 :]
        i += 2 if SCRIPT_OPTIONS.get(token, False) else 1
    return argv, []


def _target(args: argparse.Namespace) -> Target:
    """The script or module to run, checked before any work."""
    if args.module is not None:
        if args.script is not None:
            raise _Usage(
                f"argument -m: give a script or -m MODULE, not both ({args.script!r} and -m {args.module})"
            )
        try:
            found = importlib.util.find_spec(args.module)
        except (ImportError, ValueError) as e:
            raise _Usage(f"argument -m: {args.module!r}: {_first_line(e)}") from e
        if found is None:
            raise _Usage(f"argument -m: no module named {args.module!r}")
        return Target(args.module, module=True)
    if args.script is None:
        raise _Usage("argument SCRIPT: a script to run is required (or -m MODULE)")
    if not os.path.exists(args.script):
        raise _Usage(f"argument SCRIPT: can't open file {args.script!r}: no such file")
    return Target(args.script, module=False)


def _check_json(args: argparse.Namespace) -> None:
    """``--json PATH`` checked before the script runs, and made absolute: the script may change
    the current folder."""
    path: Path | None = args.json
    if path is None:
        return
    if path.is_dir():
        raise _Usage(
            f"argument --json: {str(path)!r} is a folder; give a file name, e.g. {str(path / 'safeopt.json')!r}"
        )
    if not path.parent.is_dir():
        raise _Usage(f"argument --json: {str(path)!r}: the folder {str(path.parent)!r} does not exist")
    args.json_path = Path(os.path.abspath(path))


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float made a string, ``"inf"``, ``"-inf"`` or ``"nan"``: JSON
    has no such numbers (Python would write ``Infinity`` and ``NaN``, which JSON readers refuse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _write_json(args: argparse.Namespace, data: dict[str, Any]) -> bool:
    """Write ``data`` to ``--json``'s path, if given, and say so; False, with a one-line error,
    when it cannot be written."""
    if args.json is None:
        return True
    try:
        args.json_path.write_text(json.dumps(_finite(data), indent=1, allow_nan=False) + "\n")
    except OSError as e:
        print(
            f"safeopt {args.command}: error: argument --json: could not write {str(args.json)!r}: "
            f"{e.strerror or e}",
            file=sys.stderr,
        )
        return False
    print(f"safeopt {args.command}: wrote {args.json}", file=sys.stderr)
    return True


def _invoked_as() -> str:
    """How this command was started, for the command a report suggests."""
    return "safeopt" if Path(sys.argv[0]).name == "safeopt" else "python -m safeopt"


def _watch(args: argparse.Namespace) -> int:
    target = _target(args)
    _check_json(args)
    head = _invoked_as()

    def fix(wrap_all: bool, rows: str | None) -> str:
        what = [
            *(["--wrap-all"] if wrap_all else []),
            *(["--rows", rows] if rows else []),
            *(["-m", target.name] if target.module else [target.name]),
        ]
        return f"{head} run {shlex.join([*what, *args.script_args])}"

    watch = GlobalWatch()
    watch.start()
    status, written = 1, True
    try:
        status = run_script(target, args.script_args, exiting=args.exiting)
    finally:
        watch.stop()
        flush_stdout()
        print(watch.text(fix), file=sys.stderr)
        written = _write_json(args, watch.as_dict())
    return status if written or status else 1


def _run(args: argparse.Namespace) -> int:
    if args.module is None:
        _target(args)
    _check_json(args)
    try:
        patched = patch(rows=args.rows, wrap_all=args.wrap_all)
    except ValueError as e:
        raise _Usage(f"argument --rows: {e}") from e
    try:
        # -m: the module's packages are imported while looking for it; patched by then, as
        # `from torch.optim import AdamW` in a package's __init__ must see safeopt's class.
        target = _target(args)
    except BaseException:
        unpatch()
        raise
    status, written = 1, True
    try:
        status = run_script(target, args.script_args, exiting=args.exiting)
    finally:
        unpatch()
        flush_stdout()
        print(patched.summary(), file=sys.stderr)
        written = _write_json(args, patched.as_dict())
    return status if written or status else 1


def _script_parser(sub: Any, name: str, help_text: str, description: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        name,
        allow_abbrev=False,  # `--js o.json` must not be taken for --json
        help=help_text,
        description=description,
        usage=f"safeopt {name} [options] SCRIPT [ARGS ...]  or  safeopt {name} [options] -m MODULE [ARGS ...]",
    )
    p.add_argument("script", nargs="?", metavar="SCRIPT", help="the script to run, as python runs it")
    p.add_argument("-m", dest="module", metavar="MODULE", help="run a module as python -m does")
    p.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="also write the report as JSON to PATH",
    )
    return p


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safeopt", description=DESCRIPTION)
    parser.add_argument(
        "--version", action="version", version=f"safeopt {__version__} (torch {torch.__version__})"
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,bench,watch,run}")
    d = sub.add_parser(
        "demo",
        help="show how far idle parameters drift under torch.optim and under safeopt",
        description="Five training loops people run, each with torch.optim and with safeopt: how far "
        "the parameters without a gradient drift under each, as a table and a plot.",
    )
    d.add_argument(
        "--out",
        type=Path,
        default=Path("safeopt-demo.png"),
        help="where to write the plot (default safeopt-demo.png; .png when no extension is given)",
    )
    d.add_argument("--no-plot", action="store_true", help="print the table only")
    b = sub.add_parser(
        "bench",
        help="time safeopt's step against torch's, interleaved in one process",
        description="Time optimizer.step() of safeopt against torch on the same parameters and grads, "
        "in interleaved rounds, and print the times, their ratio and the memory a step allocates.",
    )
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
        help="a function, called with no arguments, that returns your model (nn.Module) or its "
        "parameters; MODULE is imported from the current folder or the Python path",
    )
    b.add_argument(
        "--optimizer",
        type=_Optimizer,
        default=_Optimizer("AdamW"),
        metavar="'CLASS(KEY=VALUE, ...)'",
        help="a torch.optim class and its options (default AdamW)",
    )
    b.add_argument(
        "--idle",
        type=_fraction,
        nargs="+",
        default=[0.0, 0.5],
        metavar="FRACTION",
        help="fractions of the work without a gradient, one row each (default 0 0.5)",
    )
    b.add_argument(
        "--idle-by",
        choices=["zero", "freeze", "rows"],
        default="zero",
        help="how the idle part gets no gradient: all-zero grads, frozen in safeopt, or zero rows "
        "of every matrix with lazy='rows' (default zero)",
    )
    b.add_argument(
        "--device",
        type=_device,
        default=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
        help="where the parameters live, e.g. cpu or cuda:1 (default cuda when available, else cpu)",
    )
    b.add_argument(
        "--dtype",
        type=_dtype,
        default=torch.float32,
        help="the parameters' dtype with --tensors, e.g. bfloat16 (default float32)",
    )
    b.add_argument("--rounds", type=_positive_int, default=7, help="interleaved timing rounds (default 7)")
    b.add_argument("--min-run-time", type=_seconds, default=1.0, help="seconds timed per side (default 1)")
    w = _script_parser(
        sub,
        "watch",
        "run a training script unchanged and report what its optimizers moved without a gradient",
        "Run SCRIPT as python would (its output and exit status unchanged) and, at exit, report on "
        "stderr, per optimizer that stepped, the parameters that had no gradient in some step and how "
        "far the optimizer moved them there, with the command that fixes it. Every number the script "
        "computes stays the same. Everything after SCRIPT goes to the script.",
    )
    r = _script_parser(
        sub,
        "run",
        "run a training script with torch.optim.Adam, AdamW and SGD replaced by safeopt's",
        "Run SCRIPT as python would, with torch.optim.Adam, AdamW and SGD replaced by safeopt's for the "
        "whole run (code that looks them up during the run gets safeopt's), and say at exit what was "
        "replaced and how many idle parameter-steps were skipped. Everything after SCRIPT goes to the "
        "script.",
    )
    r.add_argument(
        "--wrap-all",
        action="store_true",
        help="also give every other torch.optim optimizer built during the run safeopt's rule (safeopt.wrap)",
    )
    r.add_argument(
        "--rows",
        metavar="PATTERN",
        help="parameters whose name matches this regular expression (e.g. 'embed|experts') get "
        "lazy='rows' in a param group of their own",
    )
    for command in (d, b, w, r):
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    ours, theirs = _split_script(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(ours)
    args.script_args = theirs
    args.exiting = argv is None  # the program itself (not a caller that goes on): see _script.run
    try:
        if args.command == "watch":
            return _watch(args)
        if args.command == "run":
            return _run(args)
        if args.command == "demo":
            out = None
            if not args.no_plot:
                try:
                    out = check_out(args.out)
                except ValueError as e:
                    raise _Usage(f"argument --out: {e}") from e
            return demo(out)
        if args.tensors is None:
            args.tensors = [_tensors("100x2000")]
        return _bench(args)
    except _Usage as e:
        if args.debug:
            raise
        print(f"safeopt {args.command}: error: {e}", file=sys.stderr)  # as argparse words its own
        return 2
    except Exception as e:
        if args.debug:
            raise
        print(
            f"safeopt {args.command}: error: {_first_line(e)} (--debug shows the traceback)", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
