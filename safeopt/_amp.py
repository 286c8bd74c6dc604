"""A step that GradScaler skips leaves every parameter as if it had not happened.

GradScaler hands torch's fused Adam, AdamW and SGD its ``found_inf`` and calls their step
whatever it holds; their kernels return at once when it is 1. The parameters, the state tensors
the kernels update, and Adam's ``step`` (incremented, then decremented by ``found_inf``) stay as
they were, and a parameter's first skipped step leaves Adam's freshly allocated state as torch
allocates it: zeros, step 0, what safeopt gives any idle parameter with a grad.

One thing does not stay: torch's fused SGD with momentum starts the momentum buffers of a first
step with ``empty_like`` and lets the kernel fill them. Skipped, the parameter keeps a buffer of
uninitialised memory and counts as started, and its next real update moves it by that garbage.
torch reaches that only at an optimizer's very first step; under the lazy rule a parameter's
first update comes whenever its grad is first nonzero, at any step. So a buffer that a skipped
step created is taken out again: the parameter's next real step is torch's first step for it.

Cost: one host read of ``found_inf`` (a synchronisation on an accelerator), and only in a step
that starts a fused SGD momentum buffer while a GradScaler's ``found_inf`` is set: once per
parameter per run, as a rule. Rows of ``lazy="rows"`` are handled where they are written back
(``safeopt._rows``); the capturable step refuses unstarted buffers (``safeopt._capturable``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from safeopt._rule import GroupPlan
from safeopt._torch_compat import MOMENTUM_BUFFER, skip_flag, skips_by_found_inf

__all__ = ["forget_if_skipped", "fresh_buffers"]


def fresh_buffers(
    optimizer: torch.optim.Optimizer, groups: Sequence[dict[str, Any]], plans: Sequence[GroupPlan]
) -> list[Tensor]:
    """Before the step: the active parameters whose momentum buffer this step will create in a
    fused SGD group while a GradScaler's ``found_inf`` is set (usually none). Reads nothing."""
    if not isinstance(optimizer, torch.optim.SGD) or not isinstance(
        getattr(optimizer, "found_inf", None), Tensor
    ):
        return []
    state = optimizer.state
    return [
        p
        for group, plan in zip(groups, plans)
        if group["momentum"] != 0 and skips_by_found_inf(optimizer, group)
        for p in plan.active
        if state.get(p, {}).get(MOMENTUM_BUFFER) is None
    ]


def forget_if_skipped(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> None:
    """After the step returned: if the kernels skipped it, take out the momentum buffers it
    created for ``params`` (``fresh_buffers``). One host read, only when there are any."""
    flag = skip_flag(optimizer) if params else None
    if flag is None or not bool(flag):
        return
    for p in params:
        optimizer.state[p].pop(MOMENTUM_BUFFER, None)
