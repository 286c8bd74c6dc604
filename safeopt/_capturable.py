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
- With torch's own Adam/AdamW step, those calls are made here with torch's kernel, at the floor:
  torch's ``_init_group`` once per group, one kernel call per parameter whose grad may be zero, and
  the step counts of all of them advanced (by one minus their ``found_inf``) in one
  ``_foreach_add_`` (N + a constant kernel launches). Any other fused step (SGD, a subclass's own
  ``step``, a step being compiled) runs torch's whole step once per such parameter.
- Frozen parameters and parameters without a grad are known on the host and left out, as torch
  leaves out grad-less ones. A captured graph replays the set of its capture: freeze, unfreeze or
  a grad set to None after capture needs a new capture.
- What has no per-call skip (foreach and forloop steps, ``lazy="rows"``, ``wrap(strict=True)``)
  is decided on the host outside capture (``safeopt._lazy``) and refused, with the way out, under
  capture.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from safeopt import _device, _rule
from safeopt._row_rule import ROWS
from safeopt._torch_compat import (
    ADAM_LISTS,
    MOMENTUM_BUFFER,
    ByIdentity,
    allocate_state,
    capture_health_check,
    fused_adam_kernel,
    fused_adam_options,
    gather,
    settle,
    skips_by_found_inf,
    twin,
    untraced,
)

__all__ = ["capturing", "plan", "set_aside_unstarted", "step"]


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (never before CUDA is initialised)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


class _Group:
    __slots__ = ("always", "flagged", "frozen")

    def __init__(self) -> None:
        self.always: list[Tensor] = []  # stepped whatever their grad holds (lazy=False, no data)
        self.flagged: list[Tensor] = []  # stepped in a call of their own, skipped on the device when idle
        self.frozen: list[
            Tensor
        ] = []  # idle on the host's word (frozen, a ZeroTensor grad): torch's fresh state


def set_aside_unstarted(
    optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]], plans: list[_Group]
) -> None:
    """In a group with ``amsgrad`` on, a parameter decided on the device whose state has no
    ``max_exp_avg_sq`` (updated before ``amsgrad`` was switched on; state no update used was
    dropped before, ``_fresh.drop_unstarted``) cannot go through torch's call, whose
    ``_init_group`` raises on it. Idle, torch's class holding only the active parameters never
    sees it: it is set aside as on the host's word, untouched. With a nonzero grad it stays, for
    torch's ``KeyError``. A host read per such parameter, rare (never under capture:
    ``drop_unstarted`` refused it first)."""
    state = optimizer.state
    for group, entry in zip(groups, plans):
        if not group.get("amsgrad") or not entry.flagged:
            continue
        # (parameter, grad): a parameter decided on the device has a grad
        unstarted = [
            (p, p.grad)
            for p in entry.flagged
            if (s := state.get(p)) and "max_exp_avg_sq" not in s and p.grad is not None
        ]
        if not unstarted:
            continue
        flags = _rule.nonzero_flags([grad for _, grad in unstarted])
        idle = {id(p) for (p, _), flag in zip(unstarted, flags) if not flag}
        entry.frozen += [p for p in entry.flagged if id(p) in idle]
        entry.flagged[:] = [p for p in entry.flagged if id(p) not in idle]


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
        params = group["params"]
        if group[_rule.FROZEN]:
            entry.frozen += [p for p in params if p.grad is not None]
            continue
        frozen_ids = _rule.frozen_params(group)
        lazy = bool(group[_rule.LAZY])
        frozen, flagged, always = entry.frozen.append, entry.flagged.append, entry.always.append
        for p in params:
            grad = p.grad
            if grad is None:
                continue
            # Frozen, or a ZeroTensor (zero by construction, known without a read; torch's fused
            # kernels refuse one even when told to skip): idle, decided on the host.
            if (frozen_ids and id(p) in frozen_ids) or (lazy and grad._is_zerotensor()):
                frozen(p)
            elif lazy and not grad.is_meta:  # _device.decidable, inlined
                flagged(p)
            else:
                always(p)
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


@untraced  # sets found_inf on the optimizer's twin, which dynamo cannot trace in torch 2.11
def step(
    optimizer: torch.optim.Optimizer,
    groups: list[dict[str, Any]],
    torch_step: Callable[[Any], Any],
    plans: list[_Group],
) -> None:
    """Step the planned parameters with the skips decided on the device: torch's fused Adam/AdamW
    kernels called once per parameter whose grad may be zero (:func:`_fused_adam_step`), or else
    torch's whole step, ``torch_step(twin)``, once per such parameter (:func:`_torch_steps`)."""
    for group, entry in zip(groups, plans):
        allocate_state(optimizer, group, [p for p in entry.frozen if not optimizer.state.get(p)])
    kernels = [fused_adam_kernel(optimizer, group) for group in groups]
    # torch.compile traces torch's own step (its functionalization refuses the kernels called
    # from here); compiled, the launches are the compiler's anyway.
    if (
        not torch.compiler.is_compiling()
        and any(entry.flagged for entry in plans)
        and all(
            kernel is not None or not (entry.flagged or entry.always) for kernel, entry in zip(kernels, plans)
        )
    ):
        _fused_adam_step(optimizer, groups, plans, kernels)
    else:
        _torch_steps(optimizer, groups, torch_step, plans)


def _torch_steps(
    optimizer: torch.optim.Optimizer,
    groups: list[dict[str, Any]],
    torch_step: Callable[[Any], Any],
    plans: list[_Group],
) -> None:
    """torch's whole step once for the parameters stepped whatever their grad, and once for each
    parameter whose grad may be zero: exact for any fused step that reads ``found_inf``, at three
    kernels and all of torch's Python per parameter. Each call runs on ``twin``, the optimizer with
    groups of its own (``_torch_compat.twin``), its parameters listed and its ``found_inf`` set
    there, so the optimizer stays as it is."""
    flagged = [p for entry in plans for p in entry.flagged]
    scaler_found_inf = getattr(optimizer, "found_inf", None)
    skips, _ = _device.found_inf([p.grad for p in flagged], scaler_found_inf)  # type: ignore[misc]  # each has a grad
    calls: list[tuple[list[list[Tensor]], Tensor | None]] = []
    if any(entry.always for entry in plans):
        calls.append(([entry.always for entry in plans], scaler_found_inf))
    k = 0
    for gi, entry in enumerate(plans):
        # A parameter held twice goes into one call twice, as torch's step takes the duplicate
        # (its step count advanced twice before the kernel updates it twice).
        held: dict[int, tuple[list[Tensor], Tensor]] = {}
        for p in entry.flagged:
            held.setdefault(id(p), ([], skips[k]))[0].append(p)
            k += 1
        for listed, skip in held.values():
            calls.append(([listed if i == gi else [] for i in range(len(groups))], skip))
    copy = twin(optimizer, groups)
    try:
        for params, found_inf in calls:
            for shadow, listed in zip(copy.param_groups, params):
                shadow["params"] = listed
            vars(copy)["found_inf"] = found_inf  # GradScaler's attribute, read by torch's fused step
            torch_step(copy)
    finally:
        settle(optimizer, copy, groups, own=("found_inf", "state"))


class _OnDevice:
    """A tensor argument of torch's step moved to each device once, as ``_fused_adam`` does."""

    __slots__ = ("by_device", "value")

    def __init__(self, value: Tensor | None) -> None:
        self.value = value
        self.by_device: dict[torch.device, Tensor] = {} if value is None else {value.device: value}

    def on(self, device: torch.device) -> Tensor | None:
        if self.value is None:
            return None
        if device not in self.by_device:
            self.by_device[device] = self.value.to(device, non_blocking=True)
        return self.by_device[device]


# The flags of each optimizer's capturable step, kept from step to step (_device.Flags), by the
# optimizer's identity: two optimizers never share them, whatever their class's __eq__ and __hash__.
_FLAGS: ByIdentity[_device.Flags] = ByIdentity()


def _fused_adam_step(
    optimizer: torch.optim.Optimizer,
    groups: list[dict[str, Any]],
    plans: list[_Group],
    kernels: list[Callable[..., None] | None],
) -> None:
    """torch's fused Adam/AdamW step at its floor: torch's ``_init_group`` once per group, one
    fused kernel call per parameter whose grad may be zero (with its own ``found_inf``), one for
    the rest of each group per device and dtype, and every step count advanced in one
    ``_foreach_add_``: N + a constant kernel launches, no host read.

    The same kernels with the same arguments as ``torch.optim.adam._fused_adam``: the kernel
    updates every tensor of a call on its own, so the calls split give torch's bits. The calls
    per parameter are made in a loop of their own, the host time of a step being mostly theirs.
    """
    capture_health_check(optimizer)
    scaler_found_inf = getattr(optimizer, "found_inf", None)
    grad_scale = _OnDevice(getattr(optimizer, "grad_scale", None))
    found_inf = _OnDevice(scaler_found_inf)
    gathered: list[tuple[dict[str, Any], Callable[..., None], int, list[list[Tensor]]]] = []
    flagged_grads: list[Tensor] = []
    for group, entry, kernel in zip(groups, plans, kernels):
        if kernel is not None and (entry.always or entry.flagged):
            named = gather(optimizer, group, entry.always + entry.flagged)
            lists = [named[name] for name in ADAM_LISTS]  # type: ignore[index]  # fused_adam_kernel checked the class
            gathered.append((group, kernel, len(entry.always), lists))
            flagged_grads += lists[1][len(entry.always) :]
    flags = _FLAGS.get(optimizer)
    if flags is None:
        flags = _device.Flags()
        _FLAGS.set(optimizer, flags)
    capacity = sum(len(group["params"]) for group in groups)
    skips, advances = flags.found_inf(flagged_grads, scaler_found_inf, capacity=capacity)
    # torch's _fused_adam advances a call's step counts by one before the kernel and takes its
    # found_inf off them after; a kernel that skips reads no count, so each count is advanced by
    # one minus its call's found_inf instead, every count in one multi-tensor op (one launch on
    # one device; torch's foreach ops take several devices too).
    # The calls in torch's order, group by group: each group's shared calls (per device and
    # dtype), then its calls per parameter (_per_parameter, one entry per group): a call, its
    # arguments, and the step counts it advances.
    calls: list[tuple[Callable[..., None], tuple[Any, ...], dict[str, Any], list[Tensor]]] = []
    counts: list[Tensor] = []  # the step counts advanced by one
    flagged_counts: list[Tensor] = []  # those advanced by one minus their found_inf (advances)
    flagged_advances: list[Tensor] = []
    at = [0]  # the failed call of the group that failed, set by _per_parameter
    k = 0
    for group, kernel, always, lists in gathered:
        options = fused_adam_options(group)
        lr = group["lr"]
        # _fused_adam moves only an accelerator lr to each device
        lr_on = _OnDevice(lr) if isinstance(lr, Tensor) and lr.device.type != "cpu" else None
        kinds: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(lists[0][:always]):
            kinds.setdefault((p.device, p.dtype), []).append(i)
        for (device, _), members in kinds.items():
            some = [[t[i] for i in members] if t else [] for t in lists]
            skip = found_inf.on(device)
            on = {
                "lr": lr if lr_on is None else lr_on.on(device),
                "grad_scale": grad_scale.on(device),
                "found_inf": skip,
            }
            calls.append((kernel, tuple(some), {**options, **on}, some[-1]))
            if skip is None:
                counts += some[-1]
            else:
                flagged_counts += some[-1]
                flagged_advances += [1 - skip] * len(members)
        n = len(lists[0]) - always
        if n:
            flagged_counts += lists[-1][always:]
            flagged_advances += advances[k : k + n]
            rest = [t[always:] for t in lists]
            calls.append(
                (
                    _per_parameter,
                    (kernel, options, lr, lr_on, grad_scale, rest, skips[k : k + n], at),
                    {},
                    rest[-1],
                )
            )
            k += n
    with torch.no_grad():
        if counts:
            torch._foreach_add_(counts, 1)
        if flagged_counts:
            torch._foreach_add_(flagged_counts, flagged_advances)
        done = 0
        try:
            for call, args, kwargs, _ in calls:
                call(*args, **kwargs)
                done += 1
        except BaseException:
            # The parameters whose call did not run keep their step counts (those already
            # stepped keep their update, as after torch's step failing on a later device or
            # group). Only a call per parameter sets ``at``.
            pending = {
                id(c)
                for j, (*_, advanced) in enumerate(calls[done:])
                for c in advanced[at[0] if j == 0 else 0 :]
            }
            for c in counts:
                if id(c) in pending:
                    c.sub_(1)
            for c, a in zip(flagged_counts, flagged_advances):
                if id(c) in pending:
                    c.sub_(a)
            raise


def _per_parameter(
    kernel: Callable[..., None],
    options: dict[str, Any],
    lr: Any,
    lr_on: _OnDevice | None,
    grad_scale: _OnDevice,
    lists: list[list[Tensor]],
    skips: Sequence[Tensor],
    at: list[int],
) -> None:
    """The kernel called once per parameter of ``lists`` (torch's six lists), each with its own
    ``found_inf`` of ``skips``: the loop that most of a step's host time is spent in, kept to the
    calls. When a call raises, its index is put in ``at``."""
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = lists
    amsgrad = options["amsgrad"]
    i = 0
    try:
        if lr_on is None and grad_scale.value is None:
            for i, (p, g, m, v, mx, count, skip) in enumerate(
                zip(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or steps, steps, skips)
            ):
                kernel([p], [g], [m], [v], [mx] if amsgrad else [], [count], lr=lr, found_inf=skip, **options)
        else:  # per device, as _fused_adam moves them
            for i, (p, g, m, v, mx, count, skip) in enumerate(
                zip(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or steps, steps, skips)
            ):
                device = skip.device
                kernel(
                    [p],
                    [g],
                    [m],
                    [v],
                    [mx] if amsgrad else [],
                    [count],
                    lr=lr if lr_on is None else lr_on.on(device),
                    grad_scale=grad_scale.on(device),
                    found_inf=skip,
                    **options,
                )
    except BaseException:
        at[0] = i
        raise
