"""safeopt.watch: measure the ghost update in any torch optimizer, without changing what it does.

The watch is a pair of torch step hooks (public API): before a step it copies every parameter
that has no gradient (None or all zero), and the idle slices along dim 0 (experts, embedding
rows) of every parameter of two or more dimensions that has one; after the step it compares.
Nothing else is touched, so the optimizer computes exactly what it computed unwatched. It never
communicates: a DTensor parameter is judged by this rank's shard alone (a diagnostic may run on
one rank only).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, Self

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from safeopt._row_rule import active_rows, touched_rows
from safeopt._rule import nonzero_flags

__all__ = ["ParamDrift", "SliceDrift", "Watch", "WatchReport", "param_names", "watch"]


class SliceDrift(NamedTuple):
    """What the slices along dim 0 of one parameter (experts, embedding rows) did in the steps
    where they had no gradient while the rest of the parameter had one."""

    slices: int  # how many slices the parameter has (its size along dim 0)
    idle_slices: int  # how many of them were idle in at least one such step
    idle_slice_steps: int  # (slice, step) pairs in which the slice's grad was all zero
    moved_slice_steps: int  # of those, the pairs in which the optimizer changed the slice
    moved_slices: tuple[int, ...]  # the slices that moved in at least one of those steps
    l2: float  # L2 norm of the sum of those changes
    max_abs: float  # largest absolute element of that sum


class ParamDrift(NamedTuple):
    """What one parameter did in the steps where it, or a slice of it, had no gradient."""

    name: str
    shape: tuple[int, ...]
    idle_steps: int  # steps in which its grad was None or all zero
    moved_steps: int  # of those, the steps in which the optimizer changed it
    l2: float  # L2 norm of the sum of those changes
    max_abs: float  # largest absolute element of that sum
    # Its slices along dim 0 in the steps where it had a gradient: None unless a slice was idle
    rows: SliceDrift | None = None

    def as_dict(self) -> dict[str, Any]:
        """The row as plain data (JSON): the fields, ``shape`` a list, ``rows`` a dict or absent."""
        out: dict[str, Any] = {
            "name": self.name,
            "shape": list(self.shape),
            "idle_steps": self.idle_steps,
            "moved_steps": self.moved_steps,
            "l2": self.l2,
            "max_abs": self.max_abs,
        }
        if self.rows is not None:
            out["rows"] = {**self.rows._asdict(), "moved_slices": list(self.rows.moved_slices)}
        return out


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


def _row_changes(before: Tensor, after: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
    """How the slices along dim 0 of ``after`` differ from ``before`` (same shape): a bool vector
    of the slices that changed (NaN that stayed NaN is no change, as ``_changed`` counts it) and
    ``after - before`` in ``dtype``, zero in the slices that did not change. None when none did.

    One subtraction and one L1 norm per slice decide it: a slice changed when the norm of its
    change is finite and nonzero; only slices whose norm is not finite (NaN, inf) are compared
    element by element."""
    if torch.equal(after, before):  # the usual answer under safeopt
        return None
    delta = after.to(dtype) - before.to(dtype)
    norms = torch.linalg.vector_norm(delta.reshape(delta.shape[0], -1), ord=1, dim=1)
    moved = norms.ne(0)
    unsure = torch.isfinite(norms).logical_not_()
    if bool(unsure.any()):
        ids = unsure.nonzero().squeeze(1)
        a, b = after.index_select(0, ids), before.index_select(0, ids)
        same = a == b
        if a.is_floating_point() or a.is_complex():
            same |= a.isnan() & b.isnan()
        moved[ids] = same.reshape(ids.numel(), -1).all(1).logical_not_()
    if not bool(moved.any()):
        return None
    if not bool(moved.all()):
        delta[moved.logical_not()] = 0
    return moved, delta


def _idle_rows(p: Tensor) -> Tensor | None:
    """The slices along dim 0 of ``p`` whose grad is all zero (``-0.0`` too), on this rank; None
    when there are none, or when ``p`` has fewer than two dimensions or a grad of another sparse
    layout than COO."""
    grad = p.grad
    if grad is None or p.dim() < 2 or grad.layout not in (torch.strided, torch.sparse_coo):
        return None
    grad = _local(grad)
    if grad.dim() < 2 or not grad.shape[0]:
        return None
    active, _ = touched_rows(grad)
    if active.numel() == grad.shape[0]:
        return None
    idle = torch.ones(grad.shape[0], dtype=torch.bool, device=active.device)
    idle[active] = False
    return idle.nonzero().squeeze(1)


class _Record:
    __slots__ = (
        "drift",
        "idle_steps",
        "moved_steps",
        "name",
        "row_drift",
        "row_idle",
        "row_moved",
        "row_sq",
        "sq",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.idle_steps = 0
        self.moved_steps = 0
        self.drift: Tensor | None = None  # sum of the changes made while idle, at >= float32
        self.sq = 0.0  # squared L2 norm of drift
        # Slices idle while the parameter had a gradient: per slice, in how many steps they were
        # idle and in how many of those they moved (int64 on the host), and the sum of those moves.
        self.row_idle: Tensor | None = None
        self.row_moved: Tensor | None = None
        self.row_drift: Tensor | None = None
        self.row_sq = 0.0


class WatchReport:
    """What :func:`watch` saw: per parameter, its moves in steps where it, or a slice of it, had
    no gradient.

    Falsy when nothing moved in such a step. ``str()`` is a table like the demo's.

    Attributes:
        steps: How many steps were watched.
        params: One ``ParamDrift`` per parameter that had no gradient in at least one step, or a
            slice along dim 0 without one while the rest had one, largest drift first: ``name``,
            ``shape``, ``idle_steps`` (steps without a gradient), ``moved_steps`` (of those, the
            steps in which the optimizer changed it), ``l2`` and ``max_abs`` (L2 norm and largest
            element of the sum of those changes), and ``rows``: a ``SliceDrift`` for a parameter
            of two or more dimensions some of whose slices (experts, embedding rows) had an
            all-zero grad in a step where the parameter had a gradient, else None.
        history: After each watched step, the L2 norm of the drift of all parameters together
            (whole parameters and slices).
    """

    def __init__(self, steps: int, params: list[ParamDrift], history: list[float]) -> None:
        self.steps = steps
        self.params = params
        self.history = history

    @property
    def moved(self) -> list[ParamDrift]:
        """The parameters that moved in at least one step where they, or a slice, had no gradient."""
        return [p for p in self.params if _moved(p)]

    @property
    def l2(self) -> float:
        """L2 norm of the drift of all parameters together."""
        return self.history[-1] if self.history else 0.0

    @property
    def max_abs(self) -> float:
        """Largest absolute drift of any element of any parameter."""
        return max((max(p.max_abs, p.rows.max_abs if p.rows else 0.0) for p in self.params), default=0.0)

    def __bool__(self) -> bool:
        return bool(self.moved)

    def __str__(self) -> str:
        return self.table()

    def as_dict(self) -> dict[str, Any]:
        """The report as plain data, for ``json.dumps``: ``steps``, ``l2``, ``max_abs``,
        ``history`` and ``params`` (each ``ParamDrift.as_dict()``: ``name``, ``shape``,
        ``idle_steps``, ``moved_steps``, ``l2``, ``max_abs``, and ``rows`` for a parameter whose
        slices were idle while it had a gradient)."""
        return {
            "steps": self.steps,
            "l2": self.l2,
            "max_abs": self.max_abs,
            "history": list(self.history),
            "params": [p.as_dict() for p in self.params],
        }

    def table(self, limit: int | None = 20) -> str:
        """The report as a table of at most ``limit`` parameters (None: all), largest drift first;
        a second table for the slices along dim 0 (experts, embedding rows) when any was idle
        while its parameter had a gradient."""
        whole = [p for p in self.params if p.idle_steps]
        moved = [p for p in whole if p.moved_steps]
        sliced = [p for p in self.params if p.rows is not None]
        head = (
            f"watch: {self.steps} step(s); {len(whole)} parameter(s) had no gradient in some "
            f"step, {len(moved)} of them moved there"
        )
        if sliced and not whole:
            head = f"watch: {self.steps} step(s); every parameter had a gradient in every step"
        if self.moved:
            head += f" (drift L2 {self.l2:.3g}, max abs {self.max_abs:.3g})"
        elif whole:
            head += ": no ghost update"
        lines = [head]
        if sliced:
            moved_sliced = [p for p in sliced if p.rows and p.rows.moved_slice_steps]
            lines.append(
                f"  {len(sliced)} parameter(s) had idle slices along dim 0 (experts, embedding rows) "
                f"while the rest had a gradient, {len(moved_sliced)} of them moved there"
                + ("" if moved_sliced else ": no ghost update")
            )
        if whole:
            rows = whole if limit is None else whole[:limit]
            width = max(len("parameter"), *(len(p.name) for p in rows))
            lines += [
                "",
                f"{'parameter':<{width}}  {'shape':>14}  {'idle steps':>10}  {'moved':>5}  {'drift L2':>9}  {'max abs':>9}",
            ]
            for p in rows:
                shape = "x".join(map(str, p.shape)) or "scalar"
                lines.append(
                    f"{p.name:<{width}}  {shape:>14}  {p.idle_steps:>10}  {p.moved_steps:>5}  {p.l2:>9.3g}  {p.max_abs:>9.3g}"
                )
            if len(rows) < len(whole):
                lines.append(f"... and {len(whole) - len(rows)} more (report.params lists all)")
        if sliced:
            rows = sliced if limit is None else sliced[:limit]
            width = max(len("parameter"), *(len(p.name) for p in rows))
            lines += [
                "",
                (
                    f"{'parameter':<{width}}  {'shape':>14}  {'idle slices':>11}  {'slice-steps':>11}  "
                    f"{'moved':>5}  {'drift L2':>9}  {'max abs':>9}  moved slices"
                ),
            ]
            for p in rows:
                r = p.rows
                assert r is not None
                shape = "x".join(map(str, p.shape))
                which = ",".join(map(str, r.moved_slices[:8])) + (",..." if len(r.moved_slices) > 8 else "")
                lines.append(
                    f"{p.name:<{width}}  {shape:>14}  {f'{r.idle_slices}/{r.slices}':>11}  "
                    f"{r.idle_slice_steps:>11}  {r.moved_slice_steps:>5}  {r.l2:>9.3g}  {r.max_abs:>9.3g}  "
                    f"{which or '-'}"
                )
            if len(rows) < len(sliced):
                lines.append(f"... and {len(sliced) - len(rows)} more (report.params lists all)")
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
        # (parameter, its idle slices, a copy of them) for parameters that have a gradient
        self._pending_rows: list[tuple[Tensor, Tensor, Tensor]] = []
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
        self._pending_rows = []
        params = self._params()
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        with torch.no_grad():
            if closure is not None:
                # The closure makes the grads inside step(): copy everything, decide afterwards.
                self._pending = (True, [(p, _local(p.detach()).clone()) for p in params])
                return
            idle, sliced = _decide(params)
            self._pending = (False, [(p, _local(p.detach()).clone()) for p in idle])
            self._pending_rows = _slice_copies(sliced, {})

    def _record(self, p: Tensor, names: dict[int, str]) -> _Record:
        record = self._records.get(p)
        if record is None:
            if not names:
                names.update(self._names() if self._names else param_names(self._model, self._optimizer))
            record = self._records[p] = _Record(names.get(id(p), "?"))
        return record

    def _after(self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        late, copies = self._pending
        row_copies = self._pending_rows
        self._pending = (False, [])
        self._pending_rows = []
        if late:
            params = [p for p, _ in copies]
            idle_params, sliced = _decide(params)
            idle = {id(p) for p in idle_params}
            row_copies = _slice_copies(sliced, {id(p): before for p, before in copies})
            copies = [(p, before) for p, before in copies if id(p) in idle]
        copies.reverse()  # popped from the end, in order: each copy is freed once it is read
        names: dict[int, str] = {}
        with torch.no_grad():
            self._compare_rows(row_copies, names)
            while copies:
                p, before = copies.pop()
                record = self._record(p, names)
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

    def _compare_rows(self, row_copies: list[tuple[Tensor, Tensor, Tensor]], names: dict[int, str]) -> None:
        """Count the idle slices of each parameter that had a gradient, and add up their moves."""
        row_copies.reverse()
        while row_copies:
            p, rows, before = row_copies.pop()
            record = self._record(p, names)
            after = _local(p.detach())  # a DTensor's local shard: its slices are this rank's
            n = after.shape[0] if after.dim() else 0
            if record.row_idle is None or record.row_moved is None:
                record.row_idle = torch.zeros(n, dtype=torch.int64)
                record.row_moved = torch.zeros_like(record.row_idle)
            rows_here = rows.cpu()
            if record.row_idle.numel() != n or int(rows_here.max()) >= n:
                continue  # replaced in the step by a tensor of another size: nothing to compare
            record.row_idle.index_add_(0, rows_here, torch.ones_like(rows_here))
            if after.shape[1:] != before.shape[1:] or after.dtype != before.dtype:
                record.row_moved.index_add_(0, rows_here, torch.ones_like(rows_here))
                continue  # replaced by another tensor: nothing to add up
            dtype = torch.promote_types(after.dtype, torch.float32)
            changes = _row_changes(before, after.index_select(0, rows), dtype)
            del before
            if changes is None:
                continue
            moved, delta = changes
            record.row_moved.index_add_(0, rows_here, moved.to("cpu", torch.int64))
            if record.row_drift is None:
                record.row_drift = torch.zeros((n, *delta.shape[1:]), dtype=dtype, device=delta.device)
            elif record.row_drift.shape[1:] != delta.shape[1:] or record.row_drift.dtype != dtype:
                continue  # the parameter was replaced by one of another shape: nothing to add up
            record.row_drift.index_add_(0, rows, delta)
            del delta
            sq = float(torch.linalg.vector_norm(record.row_drift)) ** 2
            self._sq += sq - record.row_sq
            record.row_sq = sq

    def report(self) -> WatchReport:
        """What was seen so far, as a :class:`WatchReport`."""
        rows = []
        for p, r in self._records.items():
            max_abs = 0.0 if r.drift is None else float(r.drift.abs().max()) if r.drift.numel() else 0.0
            slices = None
            if r.row_idle is not None and r.row_moved is not None:
                drift = r.row_drift
                slices = SliceDrift(
                    slices=int(r.row_idle.numel()),
                    idle_slices=int(r.row_idle.ne(0).sum()),
                    idle_slice_steps=int(r.row_idle.sum()),
                    moved_slice_steps=int(r.row_moved.sum()),
                    moved_slices=tuple(r.row_moved.nonzero().squeeze(1).tolist()),
                    l2=math.sqrt(r.row_sq),
                    max_abs=float(drift.abs().max()) if drift is not None and drift.numel() else 0.0,
                )
            rows.append(
                ParamDrift(
                    r.name, tuple(p.shape), r.idle_steps, r.moved_steps, math.sqrt(r.sq), max_abs, slices
                )
            )
        rows.sort(key=lambda row: (-max(row.l2, row.rows.l2 if row.rows else 0.0), -_moved(row), row.name))
        return WatchReport(self._steps, rows, list(self._history))

    def remove(self) -> None:
        """Remove the hooks: the optimizer is as it was before :func:`watch`.

        Also drops the copies a step that raised left behind (its post-hook never ran).
        """
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pending = (False, [])
        self._pending_rows = []

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


def _decide(params: list[Tensor]) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
    """The parameters without a gradient (None or all zero, on this rank), and for each other
    parameter of two or more dimensions whose grad has all-zero slices along dim 0, those slices.

    A dense grad of two or more dimensions is judged by its rows alone (``active_rows``: the
    same zero as the whole-tensor check, ``-0.0`` zero, NaN, inf and subnormals not), so it is
    read once, not once whole and once by rows: it has no gradient when no row is active."""
    active: dict[int, Tensor] = {}
    rest = []
    for p in params:
        grad = None if p.grad is None else _local(p.grad)
        if grad is not None and grad.layout is torch.strided and grad.dim() >= 2 and grad.numel():
            active[id(p)] = active_rows(grad)
        else:
            rest.append(p)
    without = {id(p) for p in _without_grad(rest)}
    idle: list[Tensor] = []
    sliced: list[tuple[Tensor, Tensor]] = []
    for p in params:
        rows = active.get(id(p))
        if rows is None:
            if id(p) in without:
                idle.append(p)
            else:
                found = _idle_rows(p)  # a sparse COO grad: the rows it names
                if found is not None:
                    sliced.append((p, found))
        elif not rows.numel():
            idle.append(p)
        else:
            n = _local(p.grad).shape[0]  # type: ignore[arg-type]  # p has a grad: its rows were read
            if rows.numel() < n:
                mask = torch.ones(n, dtype=torch.bool, device=rows.device)
                mask[rows] = False
                sliced.append((p, mask.nonzero().squeeze(1)))
    return idle, sliced


def _slice_copies(
    sliced: list[tuple[Tensor, Tensor]], copies: dict[int, Tensor]
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """For each parameter and its idle slices: a copy of those slices (taken from ``copies``,
    whole copies made before the step, where the parameter is there; else from the parameter)."""
    out = []
    for p, rows in sliced:
        source = copies.get(id(p))
        if source is None:
            source = _local(p.detach())
        rows = rows.to(source.device)
        out.append((p, rows, source.index_select(0, rows)))
    return out


def _moved(row: ParamDrift) -> int:
    return row.moved_steps + (row.rows.moved_slice_steps if row.rows else 0)


def watch(optimizer: Optimizer, model: nn.Module | None = None) -> Watch:
    """Record how far ``optimizer`` moves parameters in steps where they have no gradient.

    Works with any ``torch.optim.Optimizer`` (a safeopt one too) and changes nothing it
    computes: it registers a step pre-hook and a step post-hook, keep stepping ``optimizer``
    as before. A parameter has no gradient in a step when its ``.grad`` is None or every element
    is zero (``-0.0`` too) when ``step()`` is called. For each such parameter the watch counts
    the steps, the steps in which the optimizer changed it anyway (the ghost update), and adds
    up those changes. A parameter of two or more dimensions that has a gradient is also watched
    slice by slice along dim 0 (experts of a fused ``[E, ...]`` parameter, embedding rows): its
    slices whose grad is all zero are counted, and their moves added up, in ``ParamDrift.rows``.
    ``model`` names the parameters (``model.named_parameters()``); without it
    they are named by position, ``param_groups[g][i]``.

    Cost: a copy of the parameters without a gradient during each step, and of the idle slices
    of the others (found by one more read of each grad of two or more dimensions), and one tensor
    per parameter that moved (or whose slices did), holding the sum of its moves (at least float32). With a closure
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
