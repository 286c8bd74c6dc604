"""Run someone else's script as ``python SCRIPT ARGS`` or ``python -m MODULE ARGS`` would.

The script must not be able to tell: ``__name__ == "__main__"``, ``__file__`` (absolute, as
Python 3.9 and later set it), ``sys.argv`` with the script first, ``sys.path[0]`` the script's
folder (the current one for ``-m``), ``sys.modules["__main__"]`` its module while it runs. Its
exit status is returned as Python would make it: ``sys.exit(n)`` gives ``n``, ``sys.exit("msg")``
prints ``msg`` to stderr and gives 1, an exception prints its traceback (without this module's
and runpy's frames) through ``sys.excepthook`` and gives 1. ``KeyboardInterrupt`` is raised on,
so that Python ends the process as it would have (the shell sees the interrupt).
"""

from __future__ import annotations

import os
import runpy
import sys
import types
from collections.abc import Sequence

__all__ = ["Target", "exit_status", "run"]


class Target:
    """What to run: a script path, or a module (``-m``)."""

    def __init__(self, name: str, *, module: bool) -> None:
        self.name = name
        self.module = module

    def __str__(self) -> str:
        return f"-m {self.name}" if self.module else self.name


def exit_status(e: SystemExit) -> int:
    """The status Python exits with for ``e``; a message code is printed to stderr, as Python does."""
    code = e.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    sys.stdout.flush()
    print(code, file=sys.stderr)
    return 1


def _own(tb: types.TracebackType | None) -> types.TracebackType | None:
    """``tb`` without its first frames that belong to this module or runpy."""
    skip = {os.path.normcase(os.path.abspath(f)) for f in (__file__, runpy.__file__) if f}
    while tb is not None and os.path.normcase(os.path.abspath(tb.tb_frame.f_code.co_filename)) in skip:
        tb = tb.tb_next
    return tb


def run(target: Target, args: Sequence[str]) -> int:
    """Run ``target`` as ``__main__`` with ``args``; return its exit status (see the module docstring).

    ``sys.argv`` and ``sys.path[0]`` are put back afterwards.
    """
    saved_argv, saved_path0 = sys.argv[:], sys.path[0] if sys.path else None
    try:
        if target.module:
            sys.argv = [target.name, *args]  # runpy puts the module's file first
            if sys.path:
                sys.path[0] = os.getcwd()
            else:
                sys.path.insert(0, os.getcwd())
            runpy.run_module(target.name, run_name="__main__", alter_sys=True)
        else:
            path = os.path.abspath(target.name)
            sys.argv = [target.name, *args]
            folder = os.path.dirname(os.path.realpath(path))
            if sys.path:
                sys.path[0] = folder
            else:
                sys.path.insert(0, folder)
            runpy.run_path(path, run_name="__main__")
        return 0
    except SystemExit as e:
        return exit_status(e)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001  # python prints any other exception and exits 1
        sys.stdout.flush()
        sys.excepthook(type(e), e, _own(e.__traceback__))
        return 1
    finally:
        sys.argv = saved_argv
        if saved_path0 is not None and sys.path:
            sys.path[0] = saved_path0
