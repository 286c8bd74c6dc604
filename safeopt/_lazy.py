"""The step shared by every safeopt optimizer: torch's own step over the active parameters.

torch's ``step()`` visits ``group["params"]``. It runs on a twin of the optimizer
(``_torch_compat.twin``) whose groups list only the active parameters, so torch's
kernels (forloop, foreach, fused, capturable) run unchanged on exactly those, and the
parameters left out are not touched at all: not their values, not their state, not
their grads. The optimizer's own groups stay whole: another thread calling
``state_dict()`` meanwhile sees what it would see between steps. When every parameter is
active, the optimizer's own groups already list exactly those: torch's step runs on the
optimizer itself, and no twin is made (a few microseconds a step, ``tests/test_cost_step.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from safeopt import _amp, _capturable, _compiled, _fresh, _row_rule, _rows, _rule, _torch_compat
from safeopt._freeze import FreezeAPI
from safeopt._torch_compat import batches, unhooked, writes_into_grads

__all__ = ["LazyOptimizer", "add_group", "give_back", "lazy_step", "load_state"]


def lazy_step(
    optimizer: torch.optim.Optimizer,
    step: Callable[..., Any],
    closure: Callable[[], Any] | None,
    *,
    before: Callable[[list[_rule.GroupPlan]], Callable[[], None]] | None = None,
    hide: Literal["params", "grads"] = "params",
    pass_closure: bool = False,
) -> Any:
    """Run ``step(opt)``, torch's step on ``opt``, on the active parameters only.

    ``hide`` says how the step is kept from the inactive parameters: ``"params"`` hands ``step``
    a twin of the optimizer whose groups list only the active ones (``_torch_compat.twin``), or
    the optimizer itself when every parameter of every group is active, in one batch;
    ``"grads"`` hands it the optimizer itself, every list as it is, and sets the grad of each
    inactive parameter to None for the call (positions in the group stay what the optimizer
    was built with; the grads are put back, the same objects, afterwards).

    A closure is evaluated once, before the decision, and ``step`` gets none; with
    ``pass_closure`` (and some grad present to decide from) the grads present decide, and
    ``step(opt, closure)`` gets a closure that hides the inactive parameters' grads again after
    each evaluation (the grads they had before the step are put back afterwards).

    ``before(plans)``, if given, runs after the plan is made and returns a function that runs
    after the step, also when it raises (``wrap(strict=True)`` uses it).

    A step that raises changes nothing safeopt did: the state given to idle parameters in this
    call is taken back, and every grad is put back (:func:`give_back`).
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

    groups = _rule.with_flags(groups, optimizer.defaults)
    compiling = torch.compiler.is_compiling()
    # Traced by dynamo: the decision on the device, so the graph does not depend on the active set.
    if compiling and before is None and not pass_closure and _compiled.applies(optimizer, groups, step):
        _compiled.step(optimizer, step)
        return loss
    rows = any(group[_rule.LAZY] == _row_rule.ROWS for group in groups)
    if rows:
        _rows.check(optimizer, groups, twin=isinstance(optimizer, LazyOptimizer))
    on_device = _capturable.plan(optimizer, groups, strict=before is not None)
    if on_device is not None:  # capturable or capturing: no host read
        unstarted = _stateless(optimizer.state, [p for entry in on_device for p in entry.frozen])
        # amsgrad switched on after a step made an idle parameter's state: torch makes it anew.
        amsgrad = any(group.get("amsgrad") for group in groups)
        remade = (
            _fresh.drop_unstarted(
                optimizer,
                groups,
                [entry.flagged + entry.always for entry in on_device],
                capturing=_capturable.capturing(),
            )
            if amsgrad
            else []
        )
        try:
            if amsgrad:  # and updated before it was: idle, it stays out of torch's call
                _capturable.set_aside_unstarted(optimizer, groups, on_device)
            _capturable.step(optimizer, groups, step, on_device)
        except BaseException:
            _take_back(optimizer.state, unstarted)
            _fresh.undo(optimizer, remade)
            raise
        return loss
    plans = _rule.plan_step(groups)
    # Idle parameters with a grad get torch's fresh state (_fresh.prepare); a step that fails takes
    # it back, and puts back the fresh state dropped for the parameters it was to update.
    unstarted = _stateless(optimizer.state, [p for plan in plans for p in plan.idle_with_grad])
    dropped: _fresh.Dropped = []
    skippable: Any = None  # first buffers a GradScaler-skipped step must not start (_amp)
    by_rows = _rows.RowSteps() if rows else None
    guarded: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    held: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    after: Callable[[], None] | None = None
    # With hide="params", torch steps a twin of the optimizer whose groups list the active
    # parameters: the optimizer's own groups stay whole for anyone reading them meanwhile.
    twin: Any = None
    stepped = False
    result = None
    try:
        dropped = _fresh.prepare(
            optimizer, groups, plans
        )  # fresh state for idle params; none for first updates
        buckets: list[list[torch.Tensor]] = [[] for _ in groups]
        gathered = False  # some group steps gathered rows (buckets)
        if by_rows is not None:
            plans, buckets = by_rows.prepare(optimizer, groups, plans)  # lazy="rows": views or gathered rows
            gathered = any(buckets)
        skippable = _amp.fresh_buffers(optimizer, groups, plans)
        if hide == "grads" and gathered:
            raise ValueError(
                'hide="grads" cannot step gathered rows (lazy="rows"): they are not in the group'
            )
        active_steps = [batches(optimizer, group, plan.active) for group, plan in zip(groups, plans)]
        # Every parameter of every group active, in one batch of torch's: torch's step on the
        # optimizer itself visits what a twin's groups would list (the same parameters in the same
        # order), so no twin is made. Not while dynamo traces: the compiled step is guarded on the
        # object it steps, which stays the twin.
        whole = (
            hide == "params"
            and not gathered
            and not pass_closure
            and not compiling
            and all(
                len(steps) == 1 and len(steps[0]) == len(group["params"])
                for group, steps in zip(groups, active_steps)
            )
        )
        target = optimizer
        if hide == "params" and not whole:
            twin = target = _torch_compat.twin(optimizer, groups)
            if gathered:
                vars(twin)["state"] = by_rows.view(optimizer.state)  # type: ignore[union-attr]  # gathered: by_rows is set

        guarded = [
            (p, p.grad)
            for group, plan in zip(groups, plans)
            if writes_into_grads(optimizer, group, plan.active)
            for p in plan.active
        ]
        # Gathered rows go through torch in a step of their own: torch's foreach SGD switches every
        # tensor of a call to another code path (rounding float16 and bfloat16 differently) when one of
        # them starts its momentum buffer, as a bucket of rows often does; the group's whole parameters
        # must not depend on that.
        rounds: list[list[list[torch.Tensor]]] = []
        for group, steps, extra in zip(groups, active_steps, buckets):
            steps = steps + batches(target, group, extra) if extra else steps
            rounds.append([batch for batch in steps if batch] or [[]])
        after = before(plans) if before is not None else None
        all_params = [group["params"] for group in groups]
        # With grads hidden or a closure run inside the step, every grad of the groups is put back
        # afterwards, the same object (a closure may give an inactive parameter a new grad).
        if hide == "grads" or pass_closure:
            held = [(p, p.grad) for params in all_params for p in params]
        for p, grad in guarded:
            p.grad = grad.clone()  # type: ignore[union-attr]  # every active parameter has a grad
        # Nothing active: the wrapped step is not called. torch's step given only None grads does
        # nothing; some others raise on it (Ranger21, DAdaptSGD) or count it in a group counter.
        nothing = not gathered and not any(plan.active for plan in plans)
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
                if twin is not None:
                    for shadow, batch in zip(twin.param_groups, rounds):
                        shadow["params"] = batch[r] if r < len(batch) else []
            for p in hidden:
                p.grad = None if hide == "grads" else p.grad
            if pass_closure:

                def inner_closure(hidden: list[torch.Tensor] = hidden) -> Any:
                    with torch.enable_grad():
                        value = closure()  # type: ignore[misc]  # pass_closure: closure is not None here
                    for p in hidden:  # grads the closure gave inactive parameters stay out of the step
                        p.grad = None
                    return value

                result = step(target, inner_closure)
            else:
                step(target)
        if nothing and pass_closure:  # the loss is still the caller's to have
            with torch.enable_grad():
                result = closure()  # type: ignore[misc]  # pass_closure: closure is not None here
        stepped = True
        _amp.forget_if_skipped(optimizer, skippable)
    finally:
        if stepped and not held and not guarded and by_rows is None and after is None:
            if twin is not None:  # the usual step: all there is to put back
                _torch_compat.settle(optimizer, twin, groups, own=("state",))
        else:
            _all(
                None
                if twin is None
                else lambda: _torch_compat.settle(optimizer, twin, groups, own=("state",)),
                lambda: give_back(held),
                lambda: give_back(guarded),
                (lambda: by_rows.finish(stepped)) if by_rows is not None and by_rows.pending else None,
                after,
                None if stepped else lambda: _take_back(optimizer.state, unstarted),
                None if stepped else lambda: _fresh.undo(optimizer, dropped),
            )
    return result if pass_closure else loss


def give_back(grads: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
    """Set each parameter's grad to the given one, every one of them even when one fails (the
    first error is raised afterwards).

    torch's ``p.grad = grad`` refuses a grad whose dtype, size or device differs from the
    parameter's, which a grad changed through ``grad.data`` has (torch's own steps take it): such
    a grad is put back the way it got there, its data swapped for a stand-in around the set.
    """
    error: BaseException | None = None
    for p, grad in grads:
        try:
            try:
                p.grad = grad
            except RuntimeError:
                if grad is None:
                    raise
                data = grad.data
                grad.data = torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)
                try:
                    p.grad = grad
                finally:
                    grad.data = data
        except BaseException as e:  # noqa: BLE001  # raised below, once every one was tried
            error = error or e
    if error is not None:
        raise error


def _all(*calls: Callable[[], Any] | None) -> None:
    """Call each, every one even when one raises; then raise the first error."""
    error: BaseException | None = None
    for call in calls:
        if call is None:
            continue
        try:
            call()
        except BaseException as e:  # noqa: BLE001  # raised below, once every one was tried
            error = error or e
    if error is not None:
        raise error


def _stateless(state: Any, params: list[torch.Tensor]) -> list[tuple[torch.Tensor, dict[str, Any] | None]]:
    """The parameters without state yet, each with its empty entry (None when it has none)."""
    return [(p, state.get(p)) for p in params if not state.get(p)]


def _take_back(state: Any, stateless: list[tuple[torch.Tensor, dict[str, Any] | None]]) -> None:
    """Take back the state given since to the parameters :func:`_stateless` listed."""
    for p, empty in stateless:
        if empty is None:
            state.pop(p, None)
        else:
            empty.clear()
            state[p] = empty


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
    """``load(state_dict)`` after checking its safeopt keys; a torch state_dict loads with nothing frozen.

    What is loaded is what the optimizer's load_state_dict pre-hooks return: a pre-hook of safeopt's,
    the last, checks and keeps it.
    """

    def check(_: Any, loaded: dict[str, Any]) -> None:
        for i, group in enumerate(loaded.get("param_groups", [])):
            _rule.check_flags(group, len(group.get("params", [])), f"param group {i} of the state_dict")
        kept[:] = [loaded]

    kept = [state_dict]
    check(optimizer, state_dict)
    had_state = {id(p) for group in optimizer.param_groups for p in group["params"] if optimizer.state.get(p)}
    handle = optimizer.register_load_state_dict_pre_hook(check)
    try:
        load(state_dict)
    finally:
        handle.remove()
    _rows.restore_counts(optimizer, kept[0])
    _fresh.loaded(optimizer, had_state)  # fresh state marked again (docs/rule.md, "State allocation")
    for group in optimizer.param_groups:
        _rule.fill_flags(group, optimizer.defaults)


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
        return lazy_step(self, torch_step, closure)  # type: ignore[arg-type]  # self is also the torch optimizer (mixin)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``; also takes ``"frozen"`` and ``"lazy"`` keys."""
        if _rule.LAZY not in self.defaults:  # torch's __init__ is still adding its groups
            super().add_param_group(param_group)  # type: ignore[misc]  # the torch class after this mixin in the MRO has it
        else:
            add_group(self, super().add_param_group, param_group)  # type: ignore[misc,arg-type]  # the torch class after this mixin in the MRO has it

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict``, with safeopt's group keys (docs/rule.md, "State allocation"); a
        ``lazy="rows"`` parameter also saves the ``step`` its ``row_step`` is current at
        (``_rows.stamp_counts``)."""
        saved = _rows.stamp_counts(self, super().state_dict())  # type: ignore[misc,arg-type]  # the torch class after this mixin in the MRO has it
        return _fresh.saved(self, saved)  # type: ignore[arg-type]  # self is also the torch optimizer (mixin)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``; freeze flags come back, a torch state_dict loads unfrozen."""
        load_state(self, super().load_state_dict, state_dict)  # type: ignore[misc,arg-type]  # the torch class after this mixin in the MRO has it

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]  # the torch class after this mixin in the MRO has it
        self.defaults.setdefault(_rule.LAZY, True)
        self.defaults.setdefault(_rule.FROZEN, False)
        for group in self.param_groups:
            _rule.fill_flags(group, self.defaults)
        _fresh.remark(self)  # type: ignore[arg-type]  # self is also the torch optimizer (mixin)
