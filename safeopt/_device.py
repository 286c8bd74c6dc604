"""The rule decided on the device: each grad's verdict in a constant number of kernels.

On an accelerator the verdicts of a step cost a constant number of kernels per device and
dtype, not one per grad:

- ``probe_on_host``: the first element of every grad (a 0-d view, no kernel), stacked and read
  on the host (one kernel, one read per device). A nonzero first element proves the grad
  nonzero without reading the rest.
- ``nonzero``: the L1 norm of every grad in one multi-tensor kernel (``torch._foreach_norm``).
  A sum of absolute values is zero exactly when every element is ``+0.0`` or ``-0.0``: it
  never cancels, NaN and inf propagate, and a subnormal keeps the sum above zero.
  ``nonzero_on_host`` reads the norms (one stack and one read per device); ``found_inf``
  turns them into the per-call ``found_inf`` of torch's fused kernels on the device.

The eager step reads once per device per round (``_rule``); the capturable step hands the flags
to torch's fused kernels as ``found_inf`` (``_capturable``) and never reads them, written into
buffers it keeps from step to step (``Flags``: no tensor object made per grad and step).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Flags", "decidable", "found_inf", "nonzero", "nonzero_on_host", "probe_on_host"]


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
    if grad.is_complex():  # a conjugate view differs from its values only in signs: undone, no copy
        return torch.view_as_real(grad.conj() if grad.is_conj() else grad)
    return grad


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
        if len(members) == len(grads):  # one device and dtype, the usual case: the lists as they come
            return list(flags.unbind()), list((1 - flags).unbind())
        for i, flag, advance in zip(members, flags.unbind(), (1 - flags).unbind()):
            skips[i] = flag
            advances[i] = advance
    return skips, advances  # type: ignore[return-value]  # every position was filled


class _Slots:
    """One device's flag buffers and the 0-d views of their elements, made once.

    Made as normal tensors whatever the grad mode of the step that makes them: under
    ``torch.inference_mode()`` they would be inference tensors, which no later step outside it may
    write. Nothing is read from them before a step writes it: made while a CUDA graph is being
    captured, their memory holds nothing until the graph is replayed (the fill is captured, not
    run), and an eager step before that replay must not read it.
    """

    __slots__ = ("advance_views", "advances", "size", "skip_views", "skips")

    def __init__(self, size: int, device: torch.device) -> None:
        self.size = size
        with torch.inference_mode(False):
            self.skips = torch.empty(size, dtype=torch.float32, device=device)
            self.advances = torch.empty(size, dtype=torch.float32, device=device)
            self.skip_views = self.skips.unbind()
            self.advance_views = self.advances.unbind()


class Flags:
    """``found_inf`` into buffers kept from step to step, for one optimizer's capturable step.

    The answer is the same, but the 0-d tensors handed out are views made once of one buffer per
    device, rewritten each step: making a tensor object per grad (``unbind``) costs as much host
    time as the norms. A captured CUDA graph then writes the flags where its replays read them.
    A buffer grows when a step has more grads than it holds; the old one is kept while this object
    lives (a graph captured earlier may still write into it). Grads of several devices or dtypes,
    complex or not strided are decided by :func:`found_inf` itself.
    """

    __slots__ = ("_by_device", "_retired")

    def __init__(self) -> None:
        self._by_device: dict[torch.device, _Slots] = {}
        self._retired: list[_Slots] = []

    def found_inf(
        self, grads: list[Tensor], otherwise: Tensor | None, *, capacity: int = 0
    ) -> tuple[Sequence[Tensor], Sequence[Tensor]]:
        """:func:`found_inf`'s flags (views of buffers rewritten by the next call). Four kernels
        (norms, stack, two compares), seven with ``otherwise`` (norms, stack, copy, compare, two
        fills, subtract); a new buffer holds at least ``capacity`` grads."""
        n = len(grads)
        kinds = {(g.device, g.dtype, g.layout) for g in grads}
        if len(kinds) != 1:
            return found_inf(grads, otherwise)
        ((device, dtype, layout),) = kinds
        if layout is not torch.strided or not dtype.is_floating_point:  # complex or integer too
            return found_inf(grads, otherwise)
        slots = self._by_device.get(device)
        if slots is None or slots.size < n:
            if slots is not None:
                self._retired.append(slots)
            slots = self._by_device[device] = _Slots(max(n, capacity), device)
        norms = torch.stack(torch._foreach_norm(grads, ord=1))  # zero exactly when every element is
        skips, advances = slots.skips[:n], slots.advances[:n]
        if otherwise is None:
            torch.eq(norms, 0, out=skips)
            torch.ne(norms, 0, out=advances)  # one minus the flag, exactly: NaN is not 0
        else:  # one minus the flag as found_inf's: the float32 1 - flag
            skips.copy_(otherwise)
            skips.masked_fill_(norms.eq(0), 1.0)
            advances.fill_(1.0).sub_(skips)
        return slots.skip_views[:n], slots.advance_views[:n]


def _on_host(values: Sequence[Tensor]) -> list[bool]:
    """Whether each 0-d value is nonzero, read on the host: one stack (dtypes promote exactly:
    bool and narrow floats into a wider float) and one read per device."""
    out = [False] * len(values)
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, value in enumerate(values):
        by_device[value.device].append(i)
    for members in by_device.values():
        read = torch.stack([values[i] for i in members]).tolist()
        for i, value in zip(members, read):
            out[i] = value != 0  # NaN and inf are nonzero, -0.0 is zero
    return out


def nonzero_on_host(grads: Sequence[Tensor]) -> list[bool]:
    """``nonzero``, read on the host: one ``_foreach_norm`` per device and dtype, one stack and
    one read per device (the norms are read and compared with zero there)."""
    values = [_values(g) for g in grads]
    norms: list[Tensor | None] = [None] * len(grads)
    for (_, dtype), members in _by_kind(values).items():
        group = [values[i] for i in members]
        if dtype.is_floating_point:
            found: Sequence[Tensor] = torch._foreach_norm(group, ord=1)
        else:  # integer or bool grads: rare enough for one reduction each
            found = [v.ne(0).any() for v in group]
        for i, norm in zip(members, found):
            norms[i] = norm
    return _on_host(norms)  # type: ignore[arg-type]  # every position was filled


def probe_on_host(grads: Sequence[Tensor]) -> list[bool]:
    """``probe``, read on the host: the first elements stacked and read, one stack and one read
    per device, compared with zero there."""
    return _on_host([g[(0,) * g.dim()] for g in grads])
