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
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from safeopt._watch import Watch, WatchReport, param_names

__all__ = ["REPLACED", "GlobalWatch", "Summary", "Watched", "module_names", "optimizer_names"]

# The classes ``python -m safeopt run`` replaces; another needs its --wrap-all.
REPLACED = ("torch.optim.adam.Adam", "torch.optim.adamw.AdamW", "torch.optim.sgd.SGD")


def module_names(params: Iterable[Tensor]) -> dict[int, str]:
    """Names, by ``id``, of those of ``params`` that a live module holds: each as named by the
    outermost module holding it (a module that is no other module's child).

    When the parameters come from several outermost modules, each name starts with its module's
    class (``Generator.0.weight``), numbered when a class repeats (``Sequential#2.0.weight``).
    """
    wanted = {id(p) for p in params}
    if not wanted:
        return {}
    modules = [o for o in gc.get_objects() if issubclass(type(o), nn.Module)]
    children = {id(c) for m in modules for c in m.children()}
    found: list[tuple[nn.Module, dict[int, str]]] = []
    for root in modules:
        if id(root) in children:
            continue
        held: dict[int, str] = {}
        for name, p in root.named_parameters(remove_duplicate=False):
            if id(p) in wanted and id(p) not in held:
                held[id(p)] = name
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
    if len(used) <= 1:
        return {i: n for i, (n, _) in tagged.items()}
    labels = _root_labels(used)
    return {i: f"{labels[r]}.{n}" for i, (n, r) in tagged.items()}


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


def optimizer_names(optimizer: Optimizer) -> dict[int, str]:
    """A name for every parameter ``optimizer`` holds, by ``id``: the module's (see
    :func:`module_names`), else the optimizer's (named parameters), else ``param_groups[g][i]``."""
    names = param_names(None, optimizer)
    names.update(module_names(_held(optimizer)))
    return names


class Summary(NamedTuple):
    """What the global watch saw of one optimizer: enough for the report, without the optimizer."""

    cls: str  # module and name of its class
    n_params: int
    report: WatchReport
    data: dict[str, Any]  # its entry in the JSON


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
        self._released = released
        self.watch = Watch(optimizer, names=self.names, hooks=False)
        self.names()  # now, while the modules live: at exit the script's may be gone

    def names(self) -> dict[int, str]:
        """The names, made at the first call and again when the optimizer holds a new parameter."""
        if any(id(p) not in self._names for p in _held(self.optimizer)):
            self._names = optimizer_names(self.optimizer)
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
            params.append(
                {
                    "name": name,
                    "shape": list(p.shape),
                    "idle_steps": d.idle_steps if d else 0,
                    "moved_steps": d.moved_steps if d else 0,
                    "l2": d.l2 if d else 0.0,
                    "max_abs": d.max_abs if d else 0.0,
                }
            )
        data = {"class": self.cls, "steps": report.steps, "params": params}
        return Summary(self.cls, len(held), report, data)

    def __del__(self) -> None:
        try:
            self._released(self)
        except Exception:  # noqa: BLE001, S110  # a finalizer must not raise; the optimizer is simply left out
            pass


class GlobalWatch:
    """Global step hooks that watch every optimizer that steps, from :meth:`start` to :meth:`stop`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._attr = f"_safeopt_global_watch_{id(self):x}"  # where an optimizer keeps its Watched
        # In the order of the first steps: a live optimizer's Watched (weakly), or the summary of
        # one that was collected (written by Watched.__del__, without a lock: it runs inside GC).
        self._entries: list[weakref.ref[Watched] | Summary] = []
        self._handles: list[Any] = []

    def start(self) -> None:
        if not self._handles:
            self._handles = [
                register_optimizer_step_pre_hook(self._before),
                register_optimizer_step_post_hook(self._after),
            ]

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _released(self, watched: Watched) -> None:
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

    def text(self, fix: Callable[[bool], str]) -> str:
        """The report: a table per optimizer, a verdict and, when something moved, the command that
        fixes it (``fix(wrap_all)``: ``wrap_all`` when an optimizer that moved is not one that
        ``run`` replaces)."""
        summaries = self.summaries()
        if not summaries:
            return "safeopt watch: no torch.optim optimizer stepped during the run"
        lines = [f"safeopt watch: {len(summaries)} optimizer(s) stepped"]
        affected: list[tuple[Summary, WatchReport]] = []
        for w in summaries:
            report = w.report
            table = report.table().replace("(report.params lists all)", "(--json lists all)")
            lines += ["", f"{w.cls}: {w.n_params} parameter(s)", table]
            if report:
                affected.append((w, report))
        lines.append("")
        if not affected:
            lines.append(
                "verdict: not affected in this run: no optimizer moved a parameter in a step where it "
                "had no gradient"
            )
            return "\n".join(lines)
        moved = sum(len(r.moved) for _, r in affected)
        steps = sum(p.moved_steps for _, r in affected for p in r.moved)
        classes = ", ".join(sorted({w.cls for w, _ in affected}))
        lines.append(
            f"verdict: affected: {classes} moved {moved} parameter(s) without a gradient, "
            f"{steps} time(s) in all (the ghost update)"
        )
        others = any(w.cls not in REPLACED for w, _ in affected)
        lines.append(f"fix: {fix(others)}")
        return "\n".join(lines)
