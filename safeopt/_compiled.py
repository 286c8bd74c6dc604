"""The step while dynamo traces it (``torch.compile``): one compiled step whatever the active set.

Eagerly, the host decides which parameters take part, and torch's step gets only those. Traced, a
decision read on the host is a guard: dynamo compiles torch's step again for every distinct set of
active parameters (it guards on ``group["params"]``) and runs it eagerly past its recompile limit.
So while dynamo traces, the decision stays on the device:

- what the host knows without reading a grad stays on the host, and dynamo's guards on it are
  fine: which parameters have a grad, which are frozen, each group's ``lazy``;
- torch's own step runs on every parameter that has a grad, frozen ones included, on the
  optimizer itself (torch's ``_init_group`` gives each its state first, as torch's compiled step
  does, so the state exists before the step reads it);
- then each parameter whose grad may be zero, and each tensor of its state (step count
  included), keeps its new bits or gets its old ones back: ``torch.where(flag, new, old)`` with
  ``flag = grad.ne(0).any()``, a 0-dim tensor on the grad's device, compared as the eager rule
  compares (``-0.0`` is zero; NaN, inf and subnormals that torch does not flush are not); a
  frozen parameter and its state get their old bits back. An active parameter ends with exactly
  torch's update (torch's step updates each tensor on its own), an idle one with its bits.

It is traced as torch traces its own step: grad mode off and a graph break on either side (what
torch's ``_use_grad_for_differentiable`` does around its step, which the path calls unwrapped), so
AOT sees an inference graph and inductor can fuse the select into the update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from safeopt import _fresh, _rule
from safeopt._row_rule import ROWS
from safeopt._torch_compat import (
    enter_select_step_floats,
    init_group,
    leave_select_step_floats,
    torch_step_fn,
    without_grad_mode,
)

__all__ = ["applies", "step"]


def applies(
    optimizer: torch.optim.Optimizer, groups: Sequence[dict[str, Any]], torch_step: Callable[..., Any]
) -> bool:
    """Whether :func:`step` takes this step: torch's own non-fused Adam or AdamW step, no group
    ``differentiable`` or with ``lazy="rows"``, every grad a plain strided tensor, and no state
    without ``max_exp_avg_sq`` in a group with ``amsgrad`` (switched on since it was made)."""
    if torch_step_fn(optimizer, torch_step) is None:
        return False
    for group in groups:
        if group.get("fused") or group.get("differentiable") or group[_rule.LAZY] == ROWS:
            return False
        # amsgrad switched on after a parameter's state was made: torch's _init_group raises on it,
        # and the host tells state no update used (made while idle) from the rest.
        if group.get("amsgrad") and _fresh.amsgrad_unstarted(optimizer, group):
            return False
        for p in group["params"]:
            grad = p.grad
            if grad is not None and (
                type(grad) is not Tensor or grad.layout is not torch.strided or grad.device.type == "meta"
            ):
                return False
    return True


def step(optimizer: torch.optim.Optimizer, torch_step: Callable[..., Any]) -> None:
    """torch's step on every parameter with a grad, then the old bits back where the device says
    the parameter was idle (see the module's docstring)."""
    # As torch's own step (_use_grad_for_differentiable): grad mode off and a graph break on either
    # side, so that AOT sees an inference graph whose parameter updates inductor makes in place.
    prev = torch.is_grad_enabled()
    try:
        torch.set_grad_enabled(False)
        # The graph break, and the select frame's own record of the floats dynamo specializes, the
        # other frames' put aside: a group's float lr stays a dynamic input here, as in torch's own
        # compiled step (not a value guarded on, compiled again for each new lr).
        enter_select_step_floats(optimizer)
        _select_step(optimizer, without_grad_mode(torch_step))
    finally:
        # A graph break again, and the other frames' record back: user code sees dynamo's own.
        leave_select_step_floats(optimizer)
        torch._dynamo.graph_break()
        torch.set_grad_enabled(prev)


def _select_step(optimizer: torch.optim.Optimizer, inner: Callable[..., Any]) -> None:
    # The groups are read here through the optimizer, not passed in: dynamo runs torch's
    # _init_group while tracing only for a group it knows as optimizer.param_groups[i].
    real_groups = optimizer.param_groups
    groups = _rule.with_flags(real_groups, optimizer.defaults)
    keep: list[tuple[Tensor | None, list[Tensor], list[Tensor]]] = []  # (flag or None: old bits, now, old)
    for group, real in zip(groups, real_groups):
        if not any(p.grad is not None for p in group["params"]):
            continue
        # torch's _init_group first, as torch's step calls it: the state of every parameter with a
        # grad exists before it is read here, and dynamo guards on what it read.
        gathered = init_group(optimizer, real)
        if gathered is None:
            raise AssertionError("applies() admits torch's own Adam and AdamW only")
        frozen_ids = _rule.frozen_params(group)
        for tensors in gathered:
            p = tensors[0]
            if group[_rule.FROZEN] or id(p) in frozen_ids:
                flag = None
            elif group[_rule.LAZY]:
                flag = p.grad.ne(0).any()  # type: ignore[union-attr]  # _init_group lists params with a grad
            else:
                continue
            keep.append((flag, tensors, [t.clone() for t in tensors]))
    inner(optimizer)
    for flag, tensors, old in keep:
        for now, was in zip(tensors, old):
            if flag is None:
                now.copy_(was)
            else:
                on = flag if flag.device == now.device else flag.to(now.device)
                now.copy_(torch.where(on, now, was))
