"""The capturable step: the rule decided on the device, with no host read.

Used when a param group has ``capturable=True`` or a CUDA stream is capturing a graph. The host
cannot learn which grads are zero without a synchronisation (illegal under capture), so every
parameter with a grad stays in torch's step and decides for itself on the device:

- torch's fused Adam, AdamW and SGD kernels take a ``found_inf`` tensor and skip the whole update
  of a call where it is 1 (Adam's step count is incremented and then decremented by it, exactly).
  Each parameter whose grad may be zero gets a call of its own with ``found_inf = 1`` when its grad
  is zero, and otherwise the ``found_inf`` a GradScaler passed (or 0): an active parameter gets
  exactly torch's update, an idle one is not touched. Parameters that are active whatever their
  grad (``lazy=False``) share one call.
- Frozen parameters and parameters without a grad are known on the host and left out, as torch
  leaves out grad-less ones. A captured graph replays the set of its capture: freeze, unfreeze or
  a grad set to None after capture needs a new capture.
- What has no per-call skip (foreach and forloop steps, ``lazy="rows"``, ``wrap(strict=True)``)
  is decided on the host outside capture (``safeopt._lazy``) and refused, with the way out, under
  capture.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from safeopt import _device, _rule
from safeopt._row_rule import ROWS
from safeopt._torch_compat import MOMENTUM_BUFFER, allocate_state, skips_by_found_inf, untraced

__all__ = ["capturing", "plan", "step"]


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (never before CUDA is initialised)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


class _Group:
    __slots__ = ("always", "flagged", "frozen")

    def __init__(self) -> None:
        self.always: list[Tensor] = []  # stepped whatever their grad holds (lazy=False, no data)
        self.flagged: list[Tensor] = []  # stepped in a call of their own, skipped on the device when idle
        self.frozen: list[Tensor] = []  # frozen with a grad: given torch's fresh state, as on the host path


@untraced  # reads the real groups, not dynamo's view of them (capturable=True)
def plan(
    optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]], *, strict: bool
) -> list[_Group] | None:
    """Which parameters go into torch's step, and which decide on the device; None when this step
    should be decided on the host instead. Raises under capture when it cannot be made exact."""
    under_capture = capturing()
    if not under_capture and not any(group.get("capturable") for group in groups):
        return None
    why = _host_only(optimizer, groups, strict=strict)
    if why is not None:
        if under_capture:
            raise RuntimeError(f"safeopt cannot capture this step in a CUDA graph: {why}")
        return None  # exact on the host, at the cost of reading the flags there
    out = []
    for group in groups:
        entry = _Group()
        out.append(entry)
        frozen_at = set(range(len(group["params"])) if group[_rule.FROZEN] else group[_rule.FROZEN_PARAMS])
        for position, p in enumerate(group["params"]):
            grad = p.grad
            if grad is None:
                continue
            if position in frozen_at:
                entry.frozen.append(p)
                continue
            if group[_rule.LAZY] and _device.decidable(grad):
                entry.flagged.append(p)
            else:
                entry.always.append(p)
    if under_capture:
        _check_started(optimizer, groups, out)
    return out


def _host_only(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]], *, strict: bool) -> str | None:
    """Why this step can only be decided on the host, or None."""
    if strict:
        return "wrap(strict=True) snapshots the inactive parameters on the host; use strict=False"
    for i, group in enumerate(groups):
        if not group[_rule.LAZY] or group[_rule.FROZEN]:
            continue
        if group[_rule.LAZY] == ROWS:
            return f'param group {i} has lazy="rows", which finds the active rows on the host'
        if not skips_by_found_inf(optimizer, group):
            return (
                f"param group {i} has no per-parameter skip on the device: only torch's fused kernels "
                f"have one; construct the optimizer with fused=True (or lazy=False for this group)"
            )
    return None


def _check_started(
    optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]], plans: list[_Group]
) -> None:
    # torch's fused SGD starts a momentum buffer with empty_like and lets the kernel fill it; a
    # skipped first step would leave that garbage in the state, and a graph captured at a first
    # step replays a first step forever.
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for i, (group, entry) in enumerate(zip(groups, plans)):
        if group["momentum"] == 0:
            continue
        for p in entry.flagged:
            if optimizer.state.get(p, {}).get(MOMENTUM_BUFFER) is None:
                raise RuntimeError(
                    f"safeopt cannot capture this step in a CUDA graph: a parameter of param group {i} "
                    "has no momentum buffer yet. Take warm-up steps before capture in which every "
                    "parameter has a nonzero grad, as torch's capture recipe does"
                )


@untraced  # sets found_inf on the optimizer, which dynamo cannot trace in torch 2.11
def step(optimizer: torch.optim.Optimizer, torch_step: Callable[[], Any], plans: list[_Group]) -> None:
    """Run ``torch_step()`` over the planned parameters with the skips decided on the device."""
    groups = optimizer.param_groups
    for group, entry in zip(groups, plans):
        allocate_state(optimizer, group, [p for p in entry.frozen if not optimizer.state.get(p)])
    flagged = [p for entry in plans for p in entry.flagged]
    scaler_found_inf = getattr(optimizer, "found_inf", None)
    skips = _skips([p.grad for p in flagged], scaler_found_inf)  # type: ignore[misc]  # each has a grad
    calls: list[tuple[list[list[Tensor]], Tensor | None]] = []
    if any(entry.always for entry in plans):
        calls.append(([entry.always for entry in plans], scaler_found_inf))
    k = 0
    for gi, entry in enumerate(plans):
        for p in entry.flagged:
            calls.append(([[p] if i == gi else [] for i in range(len(groups))], skips[k]))
            k += 1
    all_params = [group["params"] for group in groups]
    had_found_inf = "found_inf" in vars(optimizer)
    try:
        for params, found_inf in calls:
            for group, listed in zip(groups, params):
                group["params"] = listed
            optimizer.found_inf = found_inf  # type: ignore[attr-defined]  # GradScaler's attribute, read by torch's fused step
            torch_step()
    finally:
        for group, params in zip(groups, all_params):
            group["params"] = params
        if had_found_inf:
            optimizer.found_inf = scaler_found_inf  # type: ignore[attr-defined]  # GradScaler's attribute, read by torch's fused step
        else:
            vars(optimizer).pop("found_inf", None)


def _skips(grads: list[Tensor], scaler_found_inf: Tensor | None) -> list[Tensor]:
    """Per grad, the ``found_inf`` its call gets: 1.0 where the grad is zero, else what the
    GradScaler passed (torch's own value for an active parameter) or 0.0."""
    flags = _device.nonzero(grads)
    out: list[Tensor | None] = [None] * len(grads)
    by_device: dict[torch.device, list[int]] = {}
    for i, flag in enumerate(flags):
        by_device.setdefault(flag.device, []).append(i)
    for device, members in by_device.items():
        idle = torch.stack([flags[i] for i in members]).logical_not()
        if scaler_found_inf is None:
            skip = idle.to(torch.float32)
        else:
            skip = torch.where(idle, 1.0, scaler_found_inf.to(device, torch.float32))
        for i, value in zip(members, skip.unbind()):
            out[i] = value
    return out  # type: ignore[return-value]  # every position was filled
