"""safeopt.watch: measure the ghost update in any torch optimizer, without changing what it does.

The watch is a pair of torch step hooks (public API): before a step it copies every parameter
that has no gradient (None or all zero), after the step it compares. Nothing else is touched, so
the optimizer computes exactly what it computed unwatched. It never communicates: a DTensor
parameter is judged by this rank's shard alone (a diagnostic may run on one rank only).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, Self

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from safeopt._rule import nonzero_flags

__all__ = ["ParamDrift", "Watch", "WatchReport", "param_names", "watch"]


class ParamDrift(NamedTuple):
    """What one parameter did in the steps where it had no gradient."""

    name: str
    shape: tuple[int, ...]
    idle_steps: int  # steps in which its grad was None or all zero
    moved_steps: int  # of those, the steps in which the optimizer changed it
    l2: float  # L2 norm of the sum of those changes
    max_abs: float  # largest absolute element of that sum


def param_names(model: nn.Module | None, optimizer: Optimizer) -> dict[int, str]:
    """A name for every parameter the optimizer holds, by ``id``.

    The model's name where the model has the parameter (the first, if shared); else the name
    the optimizer was given (``torch.optim`` keeps ``param_names`` for named parameters); else its
    position, ``param_groups[g][i]``.
    """
    names: dict[int, str] = {}
    for gi, group in enumerate(optimizer.param_groups):
        given = group.get("param_names") or []
        for i, p in enumerate(group["params"]):
            names.setdefault(id(p), given[i] if i < len(given) else f"param_groups[{gi}][{i}]")
    if model is not None:
        seen: set[int] = set()
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) not in seen:
                seen.add(id(p))
                names[id(p)] = name
    return names


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (reading it communicates nothing); any other tensor itself."""
    module = sys.modules.get("torch.distributed.tensor")  # imported by whoever made a DTensor
    dtensor = getattr(module, "DTensor", None)
    if dtensor is not None and isinstance(t, dtensor):
        local: Tensor = t.to_local()
        return local
    return t


def _changed(before: Tensor, after: Tensor) -> bool:
    if before.shape != after.shape or before.dtype != after.dtype:
        return True
    if torch.equal(after, before):  # the usual answer, and on the CPU without a temporary
        return False
    same = after == before
    if after.is_floating_point() or after.is_complex():
        nan = after.isnan()
        nan &= before.isnan()
        same |= nan  # NaN that stayed NaN did not move
        del nan
    return not bool(same.all())


class _Record:
    __slots__ = ("drift", "idle_steps", "moved_steps", "name", "sq")

    def __init__(self, name: str) -> None:
        self.name = name
        self.idle_steps = 0
        self.moved_steps = 0
        self.drift: Tensor | None = None  # sum of the changes made while idle, at >= float32
        self.sq = 0.0  # squared L2 norm of drift


class WatchReport:
    """What :func:`watch` saw: per parameter, its moves in steps where it had no gradient.

    Falsy when no parameter moved in such a step. ``str()`` is a table like the demo's.

    Attributes:
        steps: How many steps were watched.
        params: One ``ParamDrift`` per parameter that had no gradient in at least one step,
            largest drift first: ``name``, ``shape``, ``idle_steps`` (steps without a
            gradient), ``moved_steps`` (of those, the steps in which the optimizer changed it),
            ``l2`` and ``max_abs`` (L2 norm and largest element of the sum of those changes).
        history: After each watched step, the L2 norm of the drift of all parameters together.
    """

    def __init__(self, steps: int, params: list[ParamDrift], history: list[float]) -> None:
        self.steps = steps
        self.params = params
        self.history = history

    @property
    def moved(self) -> list[ParamDrift]:
        """The parameters that moved in at least one step where they had no gradient."""
        return [p for p in self.params if p.moved_steps]

    @property
    def l2(self) -> float:
        """L2 norm of the drift of all parameters together."""
        return self.history[-1] if self.history else 0.0

    @property
    def max_abs(self) -> float:
        """Largest absolute drift of any element of any parameter."""
        return max((p.max_abs for p in self.params), default=0.0)

    def __bool__(self) -> bool:
        return bool(self.moved)

    def __str__(self) -> str:
        return self.table()

    def table(self, limit: int | None = 20) -> str:
        """The report as a table of at most ``limit`` parameters (None: all), largest drift first."""
        moved = self.moved
        head = (
            f"watch: {self.steps} step(s); {len(self.params)} parameter(s) had no gradient in some "
            f"step, {len(moved)} of them moved there"
        )
        if not self.params:
            return head
        if moved:
            head += f" (drift L2 {self.l2:.3g}, max abs {self.max_abs:.3g})"
        else:
            head += ": no ghost update"
        rows = self.params if limit is None else self.params[:limit]
        width = max(len("parameter"), *(len(p.name) for p in rows))
        lines = [
            head,
            "",
            f"{'parameter':<{width}}  {'shape':>14}  {'idle steps':>10}  {'moved':>5}  {'drift L2':>9}  {'max abs':>9}",
        ]
        for p in rows:
            shape = "x".join(map(str, p.shape)) or "scalar"
            lines.append(
                f"{p.name:<{width}}  {shape:>14}  {p.idle_steps:>10}  {p.moved_steps:>5}  {p.l2:>9.3g}  {p.max_abs:>9.3g}"
            )
        if len(rows) < len(self.params):
            lines.append(f"... and {len(self.params) - len(rows)} more (report.params lists all)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<WatchReport: {self.steps} steps, {len(self.moved)} of {len(self.params)} idle parameters moved>"


class Watch:
    """Step hooks on an optimizer that record its ghost updates; made by :func:`watch`.

    Also a context manager: the hooks are removed on exit, and :meth:`report` still works.

    Two keywords serve a caller that watches many optimizers at once (``python -m safeopt
    watch``): ``names``, called with no arguments, gives the names by ``id`` instead of ``model``
    (see :func:`param_names`); ``hooks=False`` registers no hooks, the caller calls
    :meth:`before_step` and :meth:`after_step` from hooks of its own.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model: nn.Module | None = None,
        *,
        names: Callable[[], Mapping[int, str]] | None = None,
        hooks: bool = True,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"watch() takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"watch()'s model must be an nn.Module or None, got {type(model).__name__}")
        self._optimizer = optimizer
        self._model = model
        self._records: dict[Tensor, _Record] = {}  # keyed by identity, as torch keys its state
        self._pending: tuple[bool, list[tuple[Tensor, Tensor]]] = (False, [])
        self._steps = 0
        self._sq = 0.0
        self._history: list[float] = []
        self._names = names
        self._handles = (
            [
                optimizer.register_step_pre_hook(self._before),
                optimizer.register_step_post_hook(self._after),
            ]
            if hooks
            else []
        )

    @property
    def optimizer(self) -> Optimizer:
        """The watched optimizer; step it as before."""
        return self._optimizer

    def before_step(self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The step pre-hook, for a caller that registered none (``hooks=False``)."""
        self._before(optimizer, args, kwargs)

    def after_step(self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The step post-hook, for a caller that registered none (``hooks=False``)."""
        self._after(optimizer, args, kwargs)

    def _params(self) -> list[Tensor]:
        seen: set[int] = set()
        out = []
        for group in self._optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def _before(self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._pending = (False, [])  # a step that raised left its copies here: drop them first
        params = self._params()
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        with torch.no_grad():
            if closure is not None:
                # The closure makes the grads inside step(): copy everything, decide afterwards.
                self._pending = (True, [(p, _local(p.detach()).clone()) for p in params])
                return
            idle = _without_grad(params)
            self._pending = (False, [(p, _local(p.detach()).clone()) for p in idle])

    def _after(self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        late, copies = self._pending
        self._pending = (False, [])
        if late:
            idle = {id(p) for p in _without_grad([p for p, _ in copies])}
            copies = [(p, before) for p, before in copies if id(p) in idle]
        copies.reverse()  # popped from the end, in order: each copy is freed once it is read
        names: Mapping[int, str] | None = None
        with torch.no_grad():
            while copies:
                p, before = copies.pop()
                record = self._records.get(p)
                if record is None:
                    names = names or (
                        self._names() if self._names else param_names(self._model, self._optimizer)
                    )
                    record = self._records[p] = _Record(names.get(id(p), "?"))
                record.idle_steps += 1
                after = _local(p.detach())
                if not _changed(before, after):
                    continue
                record.moved_steps += 1
                if after.shape != before.shape:
                    continue  # replaced by a tensor of another shape: nothing to add up
                # The change is made in the copy's memory (after - before == -before + after,
                # exactly), so a step holds the copy and the drift, no third tensor.
                dtype = torch.promote_types(after.dtype, torch.float32)
                delta = (before if before.dtype == dtype else before.to(dtype)).neg_().add_(after)
                del before
                record.drift = delta if record.drift is None else record.drift.add_(delta)
                del delta
                sq = float(torch.linalg.vector_norm(record.drift)) ** 2
                self._sq += sq - record.sq
                record.sq = sq
        self._steps += 1
        self._history.append(math.sqrt(max(self._sq, 0.0)))

    def report(self) -> WatchReport:
        """What was seen so far, as a :class:`WatchReport`."""
        rows = []
        for p, r in self._records.items():
            max_abs = 0.0 if r.drift is None else float(r.drift.abs().max()) if r.drift.numel() else 0.0
            rows.append(
                ParamDrift(r.name, tuple(p.shape), r.idle_steps, r.moved_steps, math.sqrt(r.sq), max_abs)
            )
        rows.sort(key=lambda row: (-row.l2, -row.moved_steps, row.name))
        return WatchReport(self._steps, rows, list(self._history))

    def remove(self) -> None:
        """Remove the hooks: the optimizer is as it was before :func:`watch`.

        Also drops the copies a step that raised left behind (its post-hook never ran).
        """
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pending = (False, [])

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if not self._handles else "watching"
        return f"<safeopt.Watch of {type(self._optimizer).__name__}, {state}, {self._steps} steps>"


def _without_grad(params: Iterable[Tensor]) -> list[Tensor]:
    """The parameters whose grad is None or all zero, on this rank: a DTensor grad by its local
    shard, so that nothing here is a collective (safeopt's step decides across ranks instead)."""
    params = list(params)
    with_grad = [p for p in params if p.grad is not None]
    flags = dict(zip(map(id, with_grad), nonzero_flags([_local(p.grad) for p in with_grad])))  # type: ignore[arg-type]  # with_grad holds parameters whose grad is not None
    return [p for p in params if not flags.get(id(p), False)]


def watch(optimizer: Optimizer, model: nn.Module | None = None) -> Watch:
    """Record how far ``optimizer`` moves parameters in steps where they have no gradient.

    Works with any ``torch.optim.Optimizer`` (a safeopt one too) and changes nothing it
    computes: it registers a step pre-hook and a step post-hook, keep stepping ``optimizer``
    as before. A parameter has no gradient in a step when its ``.grad`` is None or every element
    is zero (``-0.0`` too) when ``step()`` is called. For each such parameter the watch counts
    the steps, the steps in which the optimizer changed it anyway (the ghost update), and adds
    up those changes. ``model`` names the parameters (``model.named_parameters()``); without it
    they are named by position, ``param_groups[g][i]``.

    Cost: a copy of the parameters without a gradient during each step, and one tensor per
    parameter that moved, holding the sum of its moves (at least float32). With a closure
    (``step(closure)``) every parameter is copied, since the grads are only made inside the step.
    The copies of a step that raised are dropped by the next step or by ``remove()``.

    It never communicates: a DTensor parameter (FSDP2) is judged by this rank's shard of its
    grad and its drift is that shard's, so it may watch on one rank only; each rank reports its own.

    Returns a :class:`Watch`: ``.report()`` gives a :class:`WatchReport` (falsy when no ghost
    update happened; ``print()`` it for a table), ``.remove()`` takes the hooks off, and
    ``with safeopt.watch(opt, model) as w:`` removes them at the end of the block.

    Example:
        ```python
        w = safeopt.watch(optimizer, model)
        train(model, optimizer)  # your loop, unchanged
        print(w.report())
        ```
    """
    return Watch(optimizer, model)
