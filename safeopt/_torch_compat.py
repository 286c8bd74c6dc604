"""The places where safeopt leans on torch.optim internals.

Everything else in safeopt uses public API only: the names of torch's instance attributes and
state keys, the signatures of private helpers, the hook wrapper, the fused kernels' ``found_inf``
and the casts of ``load_state_dict`` are all named here, and each has a canary in
``tests/test_torch_compat.py`` that fails, naming the torch version, when a release changes it.
Where one can, a seam falls back to documented behaviour.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

__all__ = [
    "HOOK_DICTS",
    "INSTANCE_ATTRS",
    "MOMENTUM_BUFFER",
    "STEP",
    "allocate_state",
    "batches",
    "saved_as_is",
    "skips_by_found_inf",
    "unhooked",
    "untraced",
    "writes_into_grads",
]

#: What ``Optimizer.__init__`` (and ``GradScaler`` after it) keep on an optimizer instance: its
#: groups, state and defaults, torch's per-instance hook dicts, and the attributes through which
#: ``GradScaler`` hands a fused step its scale and inf flag. ``wrap()`` makes its wrapper share
#: every one of them with the optimizer it wraps.
HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)
INSTANCE_ATTRS = (
    "param_groups",
    "state",
    "defaults",
    *HOOK_DICTS,
    "_step_supports_amp_scaling",
    "grad_scale",
    "found_inf",
)

#: State keys of torch's Adam, AdamW and SGD that safeopt reads: the per-parameter step count
#: (Adam, AdamW) and the momentum buffer (SGD; absent until a parameter's first step).
STEP = "step"
MOMENTUM_BUFFER = "momentum_buffer"


def saved_as_is(
    optimizer: torch.optim.Optimizer, state_dict: dict[str, Any], key: str, dtype: torch.dtype
) -> None:
    """Put ``key`` of each parameter's loaded state back as it was saved, in ``dtype``.

    ``Optimizer.load_state_dict`` casts every floating state tensor except ``step`` to its
    parameter's dtype (``_process_value_according_to_param_policy``): right for moments, wrong
    for a count kept beside them (a bfloat16 count stops at 256).
    """
    saved_ids = [i for group in state_dict.get("param_groups", []) for i in group.get("params", [])]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_state = state_dict.get("state", {})
    for saved_id, p in zip(saved_ids, params):
        saved = saved_state.get(saved_id)
        if saved and key in saved and key in optimizer.state.get(p, ()):
            optimizer.state[p][key] = saved[key].to(dtype=dtype, device=p.device)


_F = TypeVar("_F", bound=Callable[..., Any])


def untraced(fn: _F) -> _F:
    """``fn`` as a call that dynamo (``torch.compile``) runs without tracing it: a clean graph
    break, without the warnings that tracing safeopt's host decision logs (a ``bool()`` of a
    tensor, ctypes reads) and without the view of the param groups that dynamo gives torch's own
    optimizers (``capturable=True``). ``torch._disable_dynamo`` is ``torch.compiler.disable``
    imported at the first call, not at safeopt's import (torch.optim's constructor imports
    torch._dynamo anyway); where a torch lacks it, ``fn`` as it is."""
    disable = getattr(torch, "_disable_dynamo", None)
    return fn if disable is None else cast(_F, disable(fn))


def unhooked(step: Callable[..., Any]) -> Callable[..., Any]:
    """Return ``step`` without the hook wrapper that ``Optimizer.__init__`` installs.

    torch wraps ``type(optimizer).step`` once per class so that step pre/post hooks
    (the optimizer's own and the global ones) run around it. A safeopt optimizer's
    ``step`` already carries that wrapper, so calling torch's wrapped ``step`` from
    inside it would run every hook twice. torch marks the wrapper with ``hooked``,
    and ``functools.wraps`` keeps the original under ``__wrapped__``.
    """
    if getattr(step, "hooked", False):
        return step.__wrapped__  # type: ignore[attr-defined,no-any-return]  # set by functools.wraps
    return step


# By optimizer class. A plain dict rather than functools.cache: torch.compile traces
# allocate_state, and dynamo warns about (and ignores) lru_cache wrappers it meets.
_OUTPUTS: dict[type, tuple[str, ...] | None] = {}


def _init_group_outputs(cls: type) -> tuple[str, ...] | None:
    """The names of the arguments after ``group`` in ``cls._init_group(self, group, ...)``, or None."""
    if cls not in _OUTPUTS:
        _OUTPUTS[cls] = _signature_outputs(cls)
    return _OUTPUTS[cls]


def _signature_outputs(cls: type) -> tuple[str, ...] | None:
    init = getattr(cls, "_init_group", None)
    if init is None:
        return None
    try:
        outputs = list(inspect.signature(init).parameters.values())[2:]
    except (TypeError, ValueError):
        return None
    if not all(p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in outputs):
        return None
    return tuple(p.name for p in outputs)


def _init_group_args(group: dict[str, Any], outputs: tuple[str, ...]) -> list[Any]:
    """A fresh list per output; an argument named after a group option gets its value.

    Every output is a list torch appends to, except in torch 2.6's ``AdamW._init_group``, which
    takes ``amsgrad`` between its lists (from torch 2.7 AdamW is Adam's subclass, without it).
    """
    return [group[name] if name in _GROUP_OPTION_ARGS and name in group else [] for name in outputs]


_GROUP_OPTION_ARGS = frozenset({"amsgrad"})  # tests/test_torch_compat.py checks no other option appears


def allocate_state(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], params: list[torch.Tensor]
) -> None:
    """Allocate state for ``params`` (each with a grad) exactly as torch would, without a step.

    Every built-in torch optimizer creates its state lazily inside
    ``_init_group(group, <output lists>)``, which only gathers lists and creates
    missing state (zeros, step 0). Running it on a copy of the group that holds
    just ``params`` gives torch's tensors, dtypes and devices, and torch's own
    errors (a sparse grad for Adam, the fused device check). An optimizer without
    a compatible ``_init_group`` keeps no state for an idle parameter until its
    first real update.
    """
    outputs = _init_group_outputs(type(optimizer))
    if not params or outputs is None:
        return
    view = dict(group)
    view["params"] = params
    with torch.no_grad():
        type(optimizer)._init_group(optimizer, view, *_init_group_args(view, outputs))  # type: ignore[attr-defined]  # private, per class


def writes_into_grads(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], params: list[torch.Tensor]
) -> bool:
    """Whether torch's step for this group would modify the grads in place.

    torch's foreach SGD with nesterov momentum, no weight decay and no maximize adds
    the momentum buffer into the caller's grads (``_foreach_add_(device_grads, ...)``),
    and foreach is torch's default on CUDA. safeopt promises that ``step()`` leaves
    grads as they were, so for such groups it hands torch copies of the grads.
    """
    if not isinstance(optimizer, torch.optim.SGD) or not params:
        return False
    if group["momentum"] == 0 or not group["nesterov"] or group["maximize"] or group["weight_decay"] != 0:
        return False
    if group.get("fused"):
        return False
    foreach = group.get("foreach")
    if foreach is None:
        from torch.optim.optimizer import _default_to_fused_or_foreach

        _, foreach = _default_to_fused_or_foreach(params, group.get("differentiable", False), use_fused=False)
    return bool(foreach)


def batches(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], active: list[torch.Tensor]
) -> list[list[torch.Tensor]]:
    """The active parameters of a group, in as many torch steps as torch can take them.

    One batch, except for fused SGD with momentum: torch's ``_fused_sgd`` treats a
    step as "first" only when *no* parameter has a momentum buffer yet, and raises
    a TypeError when some have one and some do not. That mix is ordinary under the
    lazy rule (a parameter whose first nonzero grad comes late), so safeopt steps
    the two kinds separately; each is then exactly torch's update for it.
    """
    if not (isinstance(optimizer, torch.optim.SGD) and group.get("fused") and group["momentum"] != 0):
        return [active]
    # Walk the state once by items: looking each parameter up would hash it in Python.
    with_buffer = {id(p) for p, state in optimizer.state.items() if state.get("momentum_buffer") is not None}
    started = [p for p in active if id(p) in with_buffer]
    if not started or len(started) == len(active):
        return [active]
    return [started, [p for p in active if id(p) not in with_buffer]]


def skips_by_found_inf(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    """Whether torch's step for this group skips its whole update on the device when the
    optimizer's ``found_inf`` attribute is a tensor holding 1.

    GradScaler's protocol for fused optimizers: torch's fused Adam, AdamW and SGD read
    ``found_inf`` (and ``grad_scale``) from the optimizer, their kernels return before touching
    anything when it is 1, and Adam's ``step`` count, incremented before the kernel, is
    decremented by it. ``tests/test_torch_compat.py`` checks that a call with 1 changes
    nothing and a call with 0 equals a call without it.
    """
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)) and bool(
        group.get("fused")
    )
