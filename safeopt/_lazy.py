"""The step shared by every safeopt optimizer: torch's own step over the active parameters.

torch's ``step()`` visits ``group["params"]``. For the duration of the call each
group lists only its active parameters, so torch's kernels (forloop, foreach,
fused, capturable) run unchanged on exactly those, and the parameters left out
are not touched at all: not their values, not their state, not their grads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from safeopt import _capturable, _row_rule, _rows, _rule
from safeopt._freeze import FreezeAPI
from safeopt._torch_compat import STEP, batches, unhooked, writes_into_grads

__all__ = ["LazyOptimizer", "add_group", "lazy_step", "load_state"]


def lazy_step(
    optimizer: torch.optim.Optimizer,
    step: Callable[..., Any],
    closure: Callable[[], Any] | None,
    *,
    before: Callable[[list[_rule.GroupPlan]], Callable[[], None]] | None = None,
    hide: Literal["params", "grads"] = "params",
    pass_closure: bool = False,
) -> Any:
    """Run ``step()`` on the active parameters only.

    ``hide`` says how the step is kept from the inactive parameters: ``"params"`` lists only the
    active ones in ``group["params"]`` for the call; ``"grads"`` leaves every list as it is and
    sets the grad of each inactive parameter to None for the call (positions in the group stay
    what the optimizer was built with; the grads are put back, the same objects, afterwards).

    A closure is evaluated once, before the decision, and ``step()`` gets none; with
    ``pass_closure`` (and some grad present to decide from) the grads present decide, and
    ``step(closure)`` gets a closure that hides the inactive parameters' grads again after each
    evaluation (the grads they had before the step are put back afterwards).

    ``before(plans)``, if given, runs after the plan is made and returns a function that runs
    after the step, also when it raises (``wrap(strict=True)`` uses it).
    """
    loss = None
    groups = optimizer.param_groups
    # No grad at all: torch's pattern, where the closure makes the grads; nothing to decide from yet.
    pass_closure = (
        pass_closure and closure is not None and any(p.grad is not None for g in groups for p in g["params"])
    )
    if closure is not None and not pass_closure:
        with torch.enable_grad():
            loss = closure()

    rows = any(group[_rule.LAZY] == _row_rule.ROWS for group in groups)
    if rows:
        _rows.check(optimizer, groups, twin=isinstance(optimizer, LazyOptimizer))
    on_device = _capturable.plan(optimizer, groups, strict=before is not None)
    if on_device is not None:  # capturable or capturing: no host read
        _capturable.step(optimizer, step, on_device)
        return loss
    plans = _rule.plan_step(groups)
    for group, plan in zip(groups, plans):
        if plan.idle_with_grad:
            _rows.allocate_state(
                optimizer, group, [p for p in plan.idle_with_grad if not optimizer.state.get(p)]
            )
    by_rows = _rows.RowSteps()
    buckets: list[list[torch.Tensor]] = [[] for _ in groups]
    if rows:
        plans, buckets = by_rows.prepare(optimizer, groups, plans)  # lazy="rows": views or gathered rows

    guarded: list[tuple[torch.Tensor, torch.Tensor]] = [
        (p, p.grad)  # type: ignore[misc]  # every active parameter has a grad
        for group, plan in zip(groups, plans)
        if writes_into_grads(optimizer, group, plan.active)
        for p in plan.active
    ]
    # Gathered rows go through torch in a step of their own: torch's foreach SGD switches every
    # tensor of a call to another code path (rounding float16 and bfloat16 differently) when one of
    # them starts its momentum buffer, as a bucket of rows often does; the group's whole parameters
    # must not depend on that.
    rounds: list[list[list[torch.Tensor]]] = []
    for group, plan, extra in zip(groups, plans, buckets):
        steps = batches(optimizer, group, plan.active) + (batches(optimizer, group, extra) if extra else [])
        rounds.append([batch for batch in steps if batch] or [[]])
    if hide == "grads" and any(buckets):
        raise ValueError('hide="grads" cannot step gathered rows (lazy="rows"): they are not in the group')
    after = before(plans) if before is not None else None
    all_params = [group["params"] for group in groups]
    # With grads hidden or a closure run inside the step, every grad of the groups is put back
    # afterwards, the same object (a closure may give an inactive parameter a new grad).
    held = [(p, p.grad) for params in all_params for p in params] if hide == "grads" or pass_closure else []
    stepped = False
    result = None
    try:
        for p, grad in guarded:
            p.grad = grad.clone()
        # Nothing active: the wrapped step is not called. torch's step given only None grads does
        # nothing; some others raise on it (Ranger21, DAdaptSGD) or count it in a group counter.
        nothing = not any(plan.active for plan in plans) and not any(buckets)
        for r in range(0 if nothing else max([1, *map(len, rounds)])):  # max(default=): dynamo warns
            if hide == "grads":
                stepping = {id(p) for batch in rounds if r < len(batch) for p in batch[r]}
                hidden = [p for params in all_params for p in params if id(p) not in stepping]
                for p, grad in held:  # a round-hidden active parameter's grad, back for its round
                    if id(p) in stepping and p.grad is None:
                        p.grad = grad
            else:
                hidden = []
                if pass_closure:
                    stepping = {id(p) for plan in plans for p in plan.active}
                    hidden = [p for params in all_params for p in params if id(p) not in stepping]
                for group, batch in zip(groups, rounds):
                    group["params"] = batch[r] if r < len(batch) else []
            for p in hidden:
                p.grad = None if hide == "grads" else p.grad
            if pass_closure:

                def inner_closure(hidden: list[torch.Tensor] = hidden) -> Any:
                    with torch.enable_grad():
                        value = closure()  # type: ignore[misc]  # pass_closure: closure is not None here
                    for p in hidden:  # grads the closure gave inactive parameters stay out of the step
                        p.grad = None
                    return value

                result = step(inner_closure)
            else:
                step()
        if nothing and pass_closure:  # the loss is still the caller's to have
            with torch.enable_grad():
                result = closure()  # type: ignore[misc]  # pass_closure: closure is not None here
        stepped = True
    finally:
        for group, params in zip(groups, all_params):
            group["params"] = params
        for p, grad in held:
            p.grad = grad
        for p, grad in guarded:
            p.grad = grad
        try:
            if by_rows.pending:
                by_rows.finish(stepped)
        finally:
            if after is not None:
                after()
    return result if pass_closure else loss


def add_group(
    optimizer: torch.optim.Optimizer, add: Callable[[dict[str, Any]], None], param_group: dict[str, Any]
) -> None:
    """``add(param_group)`` with safeopt's keys checked and filled; a bad group is not kept."""
    _rule.check_flags(param_group, None, "the new param group")
    add(param_group)
    group = optimizer.param_groups[-1]
    try:
        _rule.check_flags(group, len(group["params"]), "the new param group")
    except ValueError:
        optimizer.param_groups.pop()
        raise
    _rule.fill_flags(group, optimizer.defaults)


def load_state(
    optimizer: torch.optim.Optimizer, load: Callable[[dict[str, Any]], None], state_dict: dict[str, Any]
) -> None:
    """``load(state_dict)`` after checking its safeopt keys; a torch state_dict loads with nothing frozen."""
    for i, group in enumerate(state_dict.get("param_groups", [])):
        _rule.check_flags(group, len(group.get("params", [])), f"param group {i} of the state_dict")
    had_state = {id(p) for group in optimizer.param_groups for p in group["params"] if optimizer.state.get(p)}
    load(state_dict)
    _rows.restore_counts(optimizer, state_dict)
    for group in optimizer.param_groups:
        _rule.fill_flags(group, optimizer.defaults)
        for p in group["params"]:
            state = optimizer.state.get(p)
            if id(p) not in had_state and state and STEP in state and float(state[STEP]) == 0:
                # Fresh state that no step touched: what safeopt allocates for an idle
                # parameter. torch's load casts its scalars (NAdam's mu_product, ASGD's eta)
                # to the parameter's dtype, while torch, having stepped only the active
                # parameters, would allocate it afresh at the first update; so does safeopt.
                # (State an optimizer makes in __init__, like Adagrad's, is left as loaded.)
                del optimizer.state[p]


class LazyOptimizer(FreezeAPI):
    """Mixin turning a ``torch.optim`` class into its lazy safeopt twin.

    ``class Adam(LazyOptimizer, torch.optim.Adam)`` accepts every argument of
    ``torch.optim.Adam`` (validated by torch) plus the keyword-only ``lazy``
    (True, False or ``"rows"``).
    """

    param_groups: list[dict[str, Any]]
    defaults: dict[str, Any]
    state: Any

    def __init__(self, params: Any, *args: Any, lazy: _rule.Lazy = True, **kwargs: Any) -> None:
        _rule.check_lazy(lazy)
        super().__init__(params, *args, **kwargs)  # type: ignore[call-arg]  # the torch class after this mixin in the MRO takes the arguments
        self.defaults.update({_rule.LAZY: lazy, _rule.FROZEN: False})
        for i, group in enumerate(self.param_groups):
            _rule.check_flags(group, len(group["params"]), f"param group {i}")
            _rule.fill_flags(group, self.defaults)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """torch's step on the active parameters only; returns the closure's loss, if any."""
        torch_step = unhooked(super().step.__func__)  # type: ignore[misc]  # super() is the torch class: its step is a plain function
        return lazy_step(self, lambda: torch_step(self), closure)  # type: ignore[arg-type]  # self is also the torch optimizer (mixin)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``; also takes ``"frozen"`` and ``"lazy"`` keys."""
        if _rule.LAZY not in self.defaults:  # torch's __init__ is still adding its groups
            super().add_param_group(param_group)  # type: ignore[misc]  # the torch class after this mixin in the MRO has it
        else:
            add_group(self, super().add_param_group, param_group)  # type: ignore[misc,arg-type]  # the torch class after this mixin in the MRO has it

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``; freeze flags come back, a torch state_dict loads unfrozen."""
        load_state(self, super().load_state_dict, state_dict)  # type: ignore[misc,arg-type]  # the torch class after this mixin in the MRO has it

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]  # the torch class after this mixin in the MRO has it
        self.defaults.setdefault(_rule.LAZY, True)
        self.defaults.setdefault(_rule.FROZEN, False)
        for group in self.param_groups:
            _rule.fill_flags(group, self.defaults)
