"""Run someone else's script as ``python SCRIPT ARGS`` or ``python -m MODULE ARGS`` would.

The script must not be able to tell: ``__name__ == "__main__"``, ``__file__`` (absolute, as
Python 3.9 and later set it), ``sys.argv`` with the script first, ``sys.path[0]`` the script's
folder (the current one for ``-m``), ``sys.modules["__main__"]`` its module while it runs. Its
exit status is returned as Python would make it: ``sys.exit(n)`` gives ``n``, ``sys.exit("msg")``
prints ``msg`` to stderr and gives 1, an exception prints its traceback (without this module's
and runpy's frames) through ``sys.excepthook`` and gives 1. ``KeyboardInterrupt`` is raised on,
so that Python ends the process as it would have (the shell sees the interrupt).

When the script's main module ends, its threads that are not daemons are joined, as Python does
at exit (``threading._shutdown``), so that what they train is seen before ``run`` returns (and
the caller reports or unpatches); daemon threads are not waited for.
"""

from __future__ import annotations

import builtins
import importlib.machinery
import io
import os
import runpy
import sys
import threading
import types
from collections.abc import Iterable, Sequence

__all__ = ["Target", "exit_status", "flush_stdout", "join_threads", "run"]


class Target:
    """What to run: a script path, or a module (``-m``)."""

    def __init__(self, name: str, *, module: bool) -> None:
        self.name = name
        self.module = module

    def __str__(self) -> str:
        return f"-m {self.name}" if self.module else self.name


def flush_stdout() -> None:
    """Flush stdout before writing to stderr; the script may have closed (or replaced) it."""
    try:
        sys.stdout.flush()
    except (ValueError, OSError, AttributeError):  # closed, a broken pipe, or no stdout at all
        pass


def exit_status(e: SystemExit) -> int:
    """The status Python exits with for ``e``; a message code is printed to stderr, as Python does."""
    code = e.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    flush_stdout()
    print(code, file=sys.stderr)
    return 1


def _own(tb: types.TracebackType | None) -> types.TracebackType | None:
    """``tb`` without its first frames that belong to this module or runpy."""
    while tb is not None and tb.tb_frame.f_globals.get("__name__") in (__name__, runpy.__name__):
        tb = tb.tb_next
    return tb


def _run_file(path: str) -> None:
    """Execute the file at ``path`` (absolute) as ``__main__``. ``runpy.run_path`` would also do
    it, but sets ``sys.argv[0]`` to the path it was given, which Python leaves as typed."""
    with io.open_code(path) as f:
        source = f.read()
    code = compile(source, path, "exec", dont_inherit=True)
    main = types.ModuleType("__main__")
    main.__file__ = path
    main.__loader__ = importlib.machinery.SourceFileLoader("__main__", path)
    main.__builtins__ = builtins  # type: ignore[attr-defined]  # set on every module Python runs
    main.__cached__ = None  # type: ignore[attr-defined]  # None for __main__, as Python sets it
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = main
    try:
        exec(code, main.__dict__)  # noqa: S102  # running the user's script is the point
    finally:
        if saved is not None:
            sys.modules["__main__"] = saved


def join_threads(before: Iterable[threading.Thread] = ()) -> None:
    """What Python does at exit once the main module has ended, for the threads the script made:
    the callbacks registered with ``threading._register_atexit`` (``concurrent.futures`` ends its
    idle workers there: without them their threads never end), then a wait for every thread that
    is not a daemon, new ones started meanwhile too. The calling thread, the main thread and the
    threads of ``before`` (alive before the script started) are not waited for."""
    for callback in reversed(getattr(threading, "_threading_atexits", [])):
        callback()
    skip = {threading.current_thread(), threading.main_thread(), *before}
    while True:
        alive = [t for t in threading.enumerate() if t not in skip and not t.daemon and t.is_alive()]
        if not alive:
            return
        for t in alive:
            t.join()


def run(target: Target, args: Sequence[str], *, exiting: bool = False) -> int:
    """Run ``target`` as ``__main__`` with ``args``; return its exit status (see the module docstring).

    ``exiting``: the process ends after this (the command line), so its threads are finished as
    Python finishes them at exit (:func:`join_threads`) before this returns; a process that goes on
    (a test, a notebook) leaves the script's threads running.

    ``sys.argv`` and ``sys.path[0]`` are put back afterwards.
    """
    saved_argv, saved_path0 = sys.argv[:], sys.path[0] if sys.path else None
    before = threading.enumerate()
    try:
        try:
            return _run(target, args)
        finally:
            if exiting:
                join_threads(before)  # the script's threads, also after an exception or sys.exit()
    finally:
        sys.argv = saved_argv
        if saved_path0 is not None and sys.path:
            sys.path[0] = saved_path0


def _run(target: Target, args: Sequence[str]) -> int:
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
            if os.path.isfile(path):
                _run_file(path)
            else:  # a folder or a zip file with a __main__.py
                runpy.run_path(path, run_name="__main__")
        return 0
    except SystemExit as e:
        return exit_status(e)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001  # python prints any other exception and exits 1
        flush_stdout()
        tb = _own(e.__traceback__)
        sys.excepthook(type(e), e.with_traceback(tb), tb)  # Python prints the exception's own
        return 1
