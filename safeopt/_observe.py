"""The global watch: every optimizer that steps in this process, wherever it was built.

``python -m safeopt watch`` needs no edit of the script it runs: torch calls its global optimizer
step hooks (public API, ``torch.optim.optimizer.register_optimizer_step_pre_hook`` and
``_post_hook``) around the step of every ``torch.optim.Optimizer``, built by the script or inside
a framework. At the first step of an optimizer a :class:`~safeopt._watch.Watch` is made for it,
registering no hooks of its own: the global hooks call it. What it computes is unchanged (the
watch copies the parameters without a gradient before the step and compares after it).

Names come from the modules that hold the parameters: :func:`module_names` looks, at the first
step, through the live ``nn.Module`` objects (the garbage collector's list) for the outermost
ones, those that are no other module's child, and names each parameter as the outermost module
holding it does (``transformer.h.0.attn.c_attn.weight``). This sees modules built before the
watch started and needs no hook on every forward (which would slow every module call and break
``torch.compile`` graphs). A parameter no module holds keeps the name the optimizer gives it (torch's
named parameters) or its position, ``param_groups[g][i]``.

An optimizer keeps its watch in its ``__dict__`` (a reference cycle): one the script drops is
collected as it would be unwatched, and what its watch saw is kept as a :class:`Summary`.
"""

from __future__ import annotations

import gc
import re
import sys
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from safeopt._groups import row_tables
from safeopt._torch_compat import untraced
from safeopt._watch import Watch, WatchReport, param_names

__all__ = ["REPLACED", "GlobalWatch", "Summary", "Watched", "module_names", "optimizer_names"]

# The classes ``python -m safeopt run`` replaces; another needs its --wrap-all.
REPLACED = ("torch.optim.adam.Adam", "torch.optim.adamw.AdamW", "torch.optim.sgd.SGD")


def module_names(params: Iterable[Tensor], tables: set[int] | None = None) -> dict[int, str]:
    """Names, by ``id``, of those of ``params`` that a live module holds: each as named by the
    outermost module holding it (a module that is no other module's child).

    ``tables``, when given, receives the ``id`` of each of ``params`` that ``safeopt.groups``
    would step by rows (``row_tables``: fused experts, embedding tables) in those modules.

    When the parameters come from several outermost modules, each name starts with its module's
    class (``Generator.0.weight``), numbered when a class repeats (``Sequential#2.0.weight``).
    """
    wanted = {id(p) for p in params}
    if not wanted:
        return {}
    modules = [o for o in gc.get_objects() if issubclass(type(o), nn.Module)]
    children: set[int] = set()
    for m in modules:
        try:
            children.update(id(c) for c in m.children())
        except Exception:  # noqa: BLE001, S112  # a module built without __init__: it holds none we name
            continue
    found: list[tuple[nn.Module, dict[int, str]]] = []
    for root in modules:
        if id(root) in children:
            continue
        root = _unwrapped(root)
        held = _held_names(root, wanted)
        if held:
            found.append((root, held))
    found.sort(key=lambda rh: -len(rh[1]))  # a parameter two trees hold goes to the larger one
    tagged: dict[int, tuple[str, int]] = {}  # name within its root, the root's index in used
    used: list[nn.Module] = []
    for root, held in found:
        fresh = {i: n for i, n in held.items() if i not in tagged}
        if fresh:
            used.append(root)
            tagged.update({i: (n, len(used) - 1) for i, n in fresh.items()})
    if tables is not None:
        for root in used:
            try:
                rows = row_tables(root)
            except Exception:  # noqa: BLE001, S112  # a module whose methods fail: no tables named in it
                continue
            tables.update(i for i in rows if i in tagged)
    if len(used) <= 1:
        return {i: n for i, (n, _) in tagged.items()}
    labels = _root_labels(used)
    return {i: f"{labels[r]}.{n}" for i, (n, r) in tagged.items()}


def _unwrapped(module: nn.Module) -> nn.Module:
    """The model a ``torch.compile(model)`` wrapper (``OptimizedModule``) holds, named as its own
    ``named_parameters()`` names it (without ``_orig_mod.``); ``module`` itself otherwise."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: no wrapper exists
    wrapper = getattr(eval_frame, "OptimizedModule", None)
    while isinstance(wrapper, type) and isinstance(module, wrapper):
        inner = vars(module).get("_modules", {}).get("_orig_mod")
        if not isinstance(inner, nn.Module):
            break
        module = inner
    return module


def _held_names(root: nn.Module, wanted: set[int]) -> dict[int, str]:
    """The names ``root`` gives those of ``wanted`` it holds, by ``id``; {} for a module whose
    ``named_parameters`` fails (built without ``__init__``, or a broken override): it is skipped."""
    try:
        try:
            named = list(root.named_parameters(remove_duplicate=False))
        except TypeError:  # an override with the signature of torch before 1.13
            named = list(root.named_parameters())
    except Exception:  # noqa: BLE001  # that module's own failure must not fail the step
        return {}
    held: dict[int, str] = {}
    for name, p in named:
        if id(p) in wanted and id(p) not in held:
            held[id(p)] = name
    return held


def _root_labels(roots: list[nn.Module]) -> list[str]:
    counts = Counter(type(r).__name__ for r in roots)
    seen: Counter[str] = Counter()
    labels = []
    for r in roots:
        cls = type(r).__name__
        seen[cls] += 1
        labels.append(cls if counts[cls] == 1 or seen[cls] == 1 else f"{cls}#{seen[cls]}")
    return labels


def _held(optimizer: Optimizer) -> list[Tensor]:
    seen: set[int] = set()
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def optimizer_names(optimizer: Optimizer, tables: set[int] | None = None) -> dict[int, str]:
    """A name for every parameter ``optimizer`` holds, by ``id``: the module's (see
    :func:`module_names`, which also fills ``tables``), else the optimizer's (named parameters),
    else ``param_groups[g][i]``."""
    names = param_names(None, optimizer)
    names.update(module_names(_held(optimizer), tables))
    return names


class Summary(NamedTuple):
    """What the global watch saw of one optimizer: enough for the report, without the optimizer."""

    cls: str  # module and name of its class
    n_params: int
    report: WatchReport
    data: dict[str, Any]  # its entry in the JSON
    tables: frozenset[str]  # the names of its expert and embedding tables (``row_tables``)


class Watched:
    """One optimizer under the global watch: its :class:`Watch` and the names of its parameters.

    Kept in the optimizer's ``__dict__`` (a reference cycle), so that an optimizer the script
    drops is collected with its watch; ``released`` is called with it then, for its summary.
    """

    def __init__(self, optimizer: Optimizer, index: int, released: Callable[[Watched], None]) -> None:
        self.optimizer = optimizer
        self.index = index
        self.cls = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
        self._names: dict[int, str] = {}
        self._tables: set[int] = set()
        self._released = released
        self.watch = Watch(optimizer, names=self.names, hooks=False)
        self.names()  # now, while the modules live: at exit the script's may be gone

    def names(self) -> dict[int, str]:
        """The names, made at the first call and again when the optimizer holds a new parameter."""
        if any(id(p) not in self._names for p in _held(self.optimizer)):
            self._tables = set()
            self._names = optimizer_names(self.optimizer, self._tables)
        return self._names

    def summary(self) -> Summary:
        report = self.watch.report()
        drift = {p.name: p for p in report.params}
        names = self.names()
        params = []
        held = _held(self.optimizer)
        for p in held:
            name = names.get(id(p), "?")
            d = drift.get(name)
            entry = d.as_dict() if d else {"idle_steps": 0, "moved_steps": 0, "l2": 0.0, "max_abs": 0.0}
            params.append({**entry, "name": name, "shape": list(p.shape)})
        data = {"class": self.cls, "steps": report.steps, "params": params}
        tables = frozenset(names[i] for i in self._tables if i in names)
        return Summary(self.cls, len(held), report, data, tables)

    def __del__(self) -> None:
        try:
            self._released(self)
        except Exception:  # noqa: BLE001, S110  # a finalizer must not raise; the optimizer is simply left out
            pass


def rows_pattern(names: list[str]) -> str | None:
    """A ``--rows`` regex matching ``names`` and their siblings in other layers: each name with
    its numbered parts (layer indices) as ``\\d+``; None for no names."""
    parts = dict.fromkeys(
        r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split("."))
        for name in names
    )
    return "|".join(parts) if parts else None


class GlobalWatch:
    """Global step hooks that watch every optimizer that steps, from :meth:`start` to :meth:`stop`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._attr = f"_safeopt_global_watch_{id(self):x}"  # where an optimizer keeps its Watched
        # In the order of the first steps: a live optimizer's Watched (weakly), or the summary of
        # one that was collected (written by Watched.__del__, without a lock: it runs inside GC).
        self._entries: list[weakref.ref[Watched] | Summary] = []
        self._handles: list[Any] = []
        self._stopped = False
        self._kept: list[Watched] = []  # from stop(): the optimizers alive then, for the report

    def start(self) -> None:
        self._stopped = False
        self._kept = []
        if not self._handles:
            # Untraced: under a compiled step (``torch.compile`` of a function calling step()) the
            # hooks run as plain Python; dynamo tracing them fails on the garbage collector's list.
            # Functions, not bound methods: torch.compiler.disable marks what it is given.
            def before(optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                self._before(optimizer, args, kwargs)

            def after(optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                self._after(optimizer, args, kwargs)

            self._handles = [
                register_optimizer_step_pre_hook(untraced(before)),
                register_optimizer_step_post_hook(untraced(after)),
            ]

    def stop(self) -> None:
        """Remove the hooks. Optimizers collected from now on are left out of the report: their
        summary would be made inside the garbage collector, at the interpreter's exit too, where
        torch's tensors may already be half torn down. Those the script dropped that the garbage
        collector has not freed yet are kept (strongly, with their optimizers) for the report."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        # Before _stopped: one collected meanwhile still writes its summary (_released).
        self._kept = [w for e in list(self._entries) if not isinstance(e, Summary) and (w := e()) is not None]
        self._stopped = True

    def _released(self, watched: Watched) -> None:
        if not self._stopped and not sys.is_finalizing():
            self._entries[watched.index] = watched.summary()

    def _before(self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        watched = vars(optimizer).get(self._attr)
        if watched is None:
            with self._lock:
                watched = vars(optimizer).get(self._attr)
                if watched is None:
                    watched = Watched(optimizer, len(self._entries), self._released)
                    self._entries.append(weakref.ref(watched))
                    vars(optimizer)[self._attr] = watched
        watched.watch.before_step(optimizer, args, kwargs)

    def _after(self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        watched = vars(optimizer).get(self._attr)
        if watched is not None:
            watched.watch.after_step(optimizer, args, kwargs)

    def summaries(self) -> list[Summary]:
        """Every optimizer watched so far, in the order of their first step."""
        out = []
        for entry in list(self._entries):
            if isinstance(entry, Summary):
                out.append(entry)
            else:
                watched = entry()
                if watched is not None:
                    out.append(watched.summary())
        return out

    def as_dict(self) -> dict[str, Any]:
        """The JSON of ``python -m safeopt watch --json``: every optimizer, every parameter it holds."""
        return {"optimizers": [s.data for s in self.summaries()]}

    def text(self, fix: Callable[[bool, str | None], str]) -> str:
        """The report: a table per optimizer, a verdict and, when something moved, the command that
        fixes it (``fix(wrap_all, rows)``: ``wrap_all`` when an optimizer that moved is not one that
        ``run`` replaces; ``rows``, a ``--rows`` pattern when slices along dim 0 moved, else None)."""
        summaries = self.summaries()
        if not summaries:
            return "safeopt watch: no torch.optim optimizer stepped during the run"
        lines = [f"safeopt watch: {len(summaries)} optimizer(s) stepped"]
        affected: list[tuple[Summary, WatchReport]] = []
        for w in summaries:
            report = w.report
            table = report.table().replace("(report.params lists all)", "(--json lists all)")
            lines += ["", f"{w.cls}: {w.n_params} parameter(s)", table]
            if any(p.moved_steps or (p.rows is not None and p.name in w.tables) for p in report.moved):
                affected.append((w, report))
        lines.append("")
        dense = sum(
            len(p.rows.moved_slices)
            for w in summaries
            for p in w.report.moved
            if p.rows is not None and p.name not in w.tables
        )
        if dense:
            lines.append(
                f"note: {dense} slice(s) along dim 0 of dense weights (units that took no part in a step) "
                'moved without a gradient; safeopt\'s rule is per parameter, lazy="rows" extends it to '
                "slices (docs/rows.md)"
            )
        if not affected:
            lines.append(
                "verdict: not affected in this run: no optimizer moved a parameter in a step where it "
                "had no gradient"
            )
            return "\n".join(lines)
        # Slices count toward the verdict in expert and embedding tables only: the rows of a dense
        # layer's weight behind units that took no part (a ReLU's dead units) are listed, not judged.
        whole = [p for _, r in affected for p in r.moved if p.moved_steps]
        sliced = [
            p
            for w, r in affected
            for p in r.moved
            if p.rows is not None and p.rows.moved_slice_steps and p.name in w.tables
        ]
        classes = ", ".join(sorted({w.cls for w, _ in affected}))
        what = []
        if whole:
            what.append(
                f"{len(whole)} parameter(s) without a gradient, {sum(p.moved_steps for p in whole)} time(s) in all"
            )
        if sliced:
            what.append(
                f"{sum(len(p.rows.moved_slices) for p in sliced if p.rows)} slice(s) along dim 0 "
                f"(experts, embedding rows) of {len(sliced)} parameter(s) without a gradient, "
                f"{sum(p.rows.moved_slice_steps for p in sliced if p.rows)} time(s) in all"
            )
        lines.append(f"verdict: affected: {classes} moved {' and '.join(what)} (the ghost update)")
        others = any(w.cls not in REPLACED for w, _ in affected)
        lines.append(f"fix: {fix(others, rows_pattern([p.name for p in sliced]))}")
        return "\n".join(lines)
