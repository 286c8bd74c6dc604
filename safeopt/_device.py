"""The rule decided on the device: each grad's verdict as a tensor, with no host read.

On an accelerator the verdicts of a step cost a constant number of kernels per device and
dtype, not one per grad:

- ``probe``: the first element of every grad (a 0-d view, no kernel), stacked and compared
  with zero. A nonzero first element proves the grad nonzero without reading the rest.
- ``nonzero``: the L1 norm of every grad in one multi-tensor kernel (``torch._foreach_norm``).
  A sum of absolute values is zero exactly when every element is ``+0.0`` or ``-0.0``: it
  never cancels, NaN and inf propagate, and a subnormal keeps the sum above zero.

Both return one flag tensor per grad, on the grad's device, in the order given. The eager step
reads them to the host once per device per round (``_rule``); the capturable step hands them to
torch's fused kernels as ``found_inf`` (``_capturable``) and never reads them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["decidable", "found_inf", "nonzero", "probe"]


def decidable(grad: Tensor) -> bool:
    """Whether the grad has data to decide on. A grad on the ``meta`` device has none: its
    parameter is left to torch, which then steps it or raises its own error."""
    return grad.device.type != "meta"


def _values(grad: Tensor) -> Tensor:
    """The elements that decide: a sparse grad's coalesced values (duplicates may cancel), a
    complex grad's real and imaginary parts."""
    if grad.layout is torch.sparse_coo:
        grad = grad.coalesce().values()
    elif grad.layout is not torch.strided:
        grad = grad.values()
    return torch.view_as_real(grad) if grad.is_complex() else grad


def _by_kind(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    kinds: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        kinds[(t.device, t.dtype)].append(i)
    return kinds


def nonzero(grads: Sequence[Tensor]) -> list[Tensor]:
    """For each grad, a 0-d bool tensor on its device: whether any element is nonzero.

    ``-0.0`` and an empty grad are zero; NaN, inf and subnormals are nonzero. One
    ``_foreach_norm`` per device and dtype; nothing is read on the host.
    """
    values = [_values(g) for g in grads]
    out: list[Tensor | None] = [None] * len(grads)
    for (_, dtype), members in _by_kind(values).items():
        group = [values[i] for i in members]
        if dtype.is_floating_point:
            flags = torch.stack(torch._foreach_norm(group, ord=1)).ne(0)
        else:  # integer or bool grads: rare enough for one reduction each
            flags = torch.stack([v.ne(0).any() for v in group])
        for i, flag in zip(members, flags.unbind()):
            out[i] = flag
    return out  # type: ignore[return-value]  # every position was filled


def found_inf(grads: Sequence[Tensor], otherwise: Tensor | None) -> tuple[list[Tensor], list[Tensor]]:
    """For each grad, the ``found_inf`` a fused optimizer call of its own takes, and one minus it:
    0-d float32 tensors on the grad's device; ``found_inf`` is 1.0 where every element is zero
    (as ``nonzero`` decides), else ``otherwise`` (a GradScaler's found_inf) or 0.0.

    Five kernels per device and dtype (norms, stack, compare, select, subtract); nothing is read
    on the host.
    """
    strided = torch.strided
    values = [g if g.layout is strided and not g.is_complex() else _values(g) for g in grads]
    skips: list[Tensor | None] = [None] * len(grads)
    advances: list[Tensor | None] = [None] * len(grads)
    on_device: dict[torch.device, Tensor] = {}
    for (device, dtype), members in _by_kind(values).items():
        group = [values[i] for i in members]
        if dtype.is_floating_point:
            zero = torch.stack(torch._foreach_norm(group, ord=1)).eq(0)
        else:  # integer or bool grads: rare enough for one reduction each
            zero = torch.stack([v.ne(0).any() for v in group]).logical_not()
        if otherwise is None:
            flags = zero.to(torch.float32)
        else:
            if device not in on_device:
                on_device[device] = otherwise.to(device, torch.float32)
            flags = torch.where(zero, 1.0, on_device[device])
        for i, flag, advance in zip(members, flags.unbind(), (1 - flags).unbind()):
            skips[i] = flag
            advances[i] = advance
    return skips, advances  # type: ignore[return-value]  # every position was filled


def probe(grads: Sequence[Tensor]) -> list[Tensor]:
    """For each non-empty strided grad, a 0-d bool tensor: whether its first element is nonzero.

    True proves the grad nonzero; False says nothing (the rest is unread). One stack and one
    compare per device and dtype.
    """
    firsts = [g[(0,) * g.dim()] for g in grads]
    out: list[Tensor | None] = [None] * len(grads)
    for members in _by_kind(firsts).values():
        flags = torch.stack([firsts[i] for i in members]).ne(0)
        for i, flag in zip(members, flags.unbind()):
            out[i] = flag
    return out  # type: ignore[return-value]  # every position was filled
