"""The one idea safeopt adds to torch.optim: which parameters take part in a step.

A parameter is *inactive* in a step when its group or the parameter itself is
frozen, its grad is None, or (with ``lazy=True``) every element of its grad
compares equal to zero. With ``lazy="rows"`` the rule applies to each row (slice
along dim 0) of a parameter of two or more dimensions (``safeopt/_rows.py``).
Everything here is a pure function of the param groups and the grads; nothing is
modified.
"""

from __future__ import annotations

import ctypes
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from safeopt import _device
from safeopt._row_rule import ROWS, touched_rows
from safeopt._torch_compat import untraced

__all__ = [
    "FLAG_KEYS",
    "GroupPlan",
    "Lazy",
    "check_flags",
    "check_lazy",
    "fill_flags",
    "frozen_params",
    "nonzero_flags",
    "plan_step",
    "with_flags",
]

#: Param-group keys safeopt adds. They travel in ``state_dict()`` like any other
#: hyperparameter; torch ignores them, so the state_dict still loads into torch.
FROZEN = "frozen"  # bool: the whole group is frozen
FROZEN_PARAMS = "frozen_params"  # sorted positions in group["params"] frozen one by one
LAZY = "lazy"  # True, False or "rows": an all-zero grad (or grad row) makes a parameter (or row) inactive
#: The ``lazy`` option's type, wherever it is taken.
Lazy = bool | Literal["rows"]
FLAG_KEYS = (FROZEN, FROZEN_PARAMS, LAZY)

#: Private switches. FORCE_DEVICE decides CPU grads as accelerator grads are decided (no host
#: probe; ``_device`` kernels and reads), so the CPU test suite exercises the device decision.
#: DEVICE_PROBE runs the first-element probe round before the full reduction on a device.
FORCE_DEVICE = False
DEVICE_PROBE = True


class GroupPlan(NamedTuple):
    """What one param group does in a step."""

    active: list[Tensor]  # stepped by torch, in group order
    idle_with_grad: list[Tensor]  # inactive although their grad is not None
    # lazy="rows": (parameter, its active rows, those rows of its grad densified when it is sparse,
    # else None) when only some rows are, or the grad is sparse
    rows: list[tuple[Tensor, Tensor, Tensor | None]]


def _values(grad: Tensor) -> Tensor:
    if grad.layout is torch.sparse_coo:
        return grad.coalesce().values()  # duplicates may cancel out
    if grad.layout is not torch.strided:
        return grad.values()
    return grad


# Reading one element's bits on the host, where torch vouches for the memory (``_readable``).
# An element whose exponent bits are not all zero is a normal number, inf or NaN: nonzero under
# every setting. One whose exponent bits are zero is a zero or a subnormal, and a subnormal is
# zero or not as torch compares it (zero under ``torch.set_flush_denormal(True)``, except in
# float16, which torch's CPU kernels do not flush): those are left to the full check, which
# compares as torch does, so a grad has one verdict wherever its subnormals sit.
# dtype -> (reader, the exponent bits of each part, bytes read)
_PROBE: dict[torch.dtype, tuple[Callable[[int], Any], int, int]] = {
    torch.float32: (ctypes.c_uint32.from_address, 0x7F80_0000, 4),
    torch.float64: (ctypes.c_uint64.from_address, 0x7FF0_0000_0000_0000, 8),
    torch.float16: (ctypes.c_uint16.from_address, 0x7C00, 2),
    torch.bfloat16: (ctypes.c_uint16.from_address, 0x7F80, 2),
    torch.complex64: (ctypes.c_uint64.from_address, 0x7F80_0000_7F80_0000, 8),
}


def _readable(grad: Tensor, size: int) -> int:
    """The address of ``grad``'s first element when its bytes may be read raw on the host, else 0.

    Only for a plain ``torch.Tensor`` (no subclass, whose data may live elsewhere), strided, on
    the CPU, not empty, whose storage is allocated (a ZeroTensor's, a resized-to-0 storage's and a
    functional tensor's are not: their data pointer is ``storage_offset * size`` above address 0)
    and holds the whole element (a storage resized below it does not). Conjugate and negative
    views qualify: their bits differ from the values only in sign bits, which the probe ignores.
    ``plan_step`` inlines this check.
    """
    if type(grad) is not Tensor or not grad.is_cpu or grad.layout is not torch.strided or not grad.numel():
        return 0
    ptr = grad.data_ptr()
    offset = grad.storage_offset()
    if ptr == offset * size or (offset + 1) * size > grad.untyped_storage().nbytes():
        return 0
    return ptr


def _extremes(values: Tensor) -> tuple[Tensor, Tensor] | None:
    """(min, max) of a floating grad's values in one read-only pass; None when that does not apply."""
    if values.is_complex():
        # A conjugate view differs from its values only in signs: undo it (a view, no copy).
        values = torch.view_as_real(values.conj() if values.is_conj() else values)
    if not values.is_floating_point() or not values.numel():
        return None
    return torch.aminmax(values)


def _has_nonzero(grad: Tensor) -> bool:
    # aminmax reads the grad once and allocates nothing; any() on floats materialises a
    # bool copy first and runs several times slower on the CPU.
    values = _values(grad)
    extremes = _extremes(values)
    if extremes is None:
        return bool(values.any())
    lo, hi = extremes
    return bool(lo) or bool(hi)  # NaN is truthy, -0.0 is not


def _surely_nonzero(grad: Tensor) -> bool:
    """True when one element read on the host proves ``grad`` has a nonzero element.

    Reading a whole grad costs 4 bytes per element against the 28 a fused Adam step
    moves. The first element of a CPU grad is read directly instead (no kernel, no
    copy); in a dense gradient it is almost never zero. False means "look closer".
    """
    probe = _PROBE.get(grad.dtype)
    if probe is None or FORCE_DEVICE:
        return False
    address = _readable(grad, probe[2])
    return bool(address and probe[0](address).value & probe[1])


def _dtensor_type() -> type | None:
    """torch's DTensor class once torch.distributed.tensor is imported (by whoever made one)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _sharded_flags(grads: Sequence[Tensor], out: list[bool], positions: list[int]) -> None:
    """The flags of DTensor grads, the same on every rank: each rank reads its own shard, then one
    all-reduce (max) per mesh dimension per mesh combines them, batched over the grads.

    A grad is nonzero when any rank's shard is. Partial placements (a pending sum) cannot be
    decided from the shards, since they could cancel: those grads are reduced first.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import Partial

    by_mesh: dict[Any, list[int]] = defaultdict(list)
    for i in positions:
        grad: Any = grads[i]
        if any(isinstance(placement, Partial) for placement in grad.placements):
            out[i] = _has_nonzero(grad.full_tensor())  # collective too: every rank calls it
        else:
            by_mesh[grad.device_mesh].append(i)
    for mesh, members in by_mesh.items():
        local = [grads[i].to_local() for i in members]  # type: ignore[attr-defined]  # DTensor, known only at run time
        flags = torch.stack(_device.nonzero(local)).to(torch.int32)
        if flags.device.type != mesh.device_type:  # shards offloaded to the CPU, a CUDA mesh
            flags = flags.to(mesh.device_type)
        for dim in range(mesh.ndim):
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
        for i, flag in zip(members, flags.tolist()):
            out[i] = bool(flag)


def _device_flags(grads: Sequence[Tensor]) -> list[bool]:
    """The flags of grads decided on their device: at most two host reads per device.

    A probe round reads every grad's first element (``_device.probe_on_host``); the grads it cannot
    prove nonzero, usually the idle ones, are then reduced in full (``_device.nonzero_on_host``), so
    active grads are not read in full. ``DEVICE_PROBE = False`` skips the probe round: one
    read per device, every grad reduced in full.
    """
    out = [False] * len(grads)
    todo = [i for i, grad in enumerate(grads) if grad.numel()]  # an empty grad is zero
    if DEVICE_PROBE:
        strided = [i for i in todo if grads[i].layout is torch.strided]
        if strided:
            seen = _device.probe_on_host([grads[i] for i in strided])
            for i, flag in zip(strided, seen):
                out[i] = flag
            todo = [i for i in todo if not out[i]]
    if todo:
        for i, flag in zip(todo, _device.nonzero_on_host([grads[i] for i in todo])):
            out[i] = flag
    return out


def _full_flags(grads: Sequence[Tensor]) -> list[bool]:
    """Whether each grad has a nonzero element: CPU grads one by one, accelerator grads in a
    constant number of kernels and host reads per device (``_device_flags``), DTensor grads with
    one all-reduce per mesh dimension."""
    out = [False] * len(grads)
    dtensor = _dtensor_type()
    sharded: list[int] = []
    on_device: list[int] = []
    for i, grad in enumerate(grads):
        if dtensor is not None and isinstance(grad, dtensor):
            sharded.append(i)
        elif not _device.decidable(grad):
            out[i] = True  # no data: left to torch, which steps it or raises its own error
        elif grad.is_cpu and not FORCE_DEVICE:
            out[i] = _has_nonzero(grad)
        else:
            on_device.append(i)
    if sharded:
        _sharded_flags(grads, out, sharded)
    if on_device:
        for i, flag in zip(on_device, _device_flags([grads[i] for i in on_device])):
            out[i] = flag
    return out


def nonzero_flags(grads: Sequence[Tensor]) -> list[bool]:
    """For each grad, whether any element is nonzero (-0.0 is zero; NaN, inf and subnormals are not)."""
    out = [True] * len(grads)
    unsure = [i for i, grad in enumerate(grads) if not _surely_nonzero(grad)]
    for i, flag in zip(unsure, _full_flags([grads[i] for i in unsure])):
        out[i] = flag
    return out


def frozen_params(group: dict[str, Any]) -> set[int]:
    """The ids of the parameters of a group frozen one by one. A parameter held at several
    positions (torch only warns about duplicates) is frozen when any of them is: it is one
    parameter, and the freeze API freezes and unfreezes every position together."""
    positions = group.get(FROZEN_PARAMS, ())  # a group added behind safeopt's back may lack it
    if not positions:
        return set()
    params = group["params"]
    return {id(params[i]) for i in positions if 0 <= i < len(params)}


@untraced  # the decision reads grads on the host: compiled steps break the graph here
def plan_step(param_groups: Sequence[dict[str, Any]]) -> list[GroupPlan]:
    """Split every group's parameters into active ones and idle ones that have a grad.

    This runs on every step, once per parameter: it is kept to one pass and a probe.
    """
    result: list[GroupPlan] = []
    unsure: list[tuple[int, Tensor, Tensor]] = []  # (group, param, grad)
    by_rows: list[tuple[int, Tensor, Tensor]] = []  # (group, param, grad)
    probes, strided, sparse = ({} if FORCE_DEVICE else _PROBE), torch.strided, torch.sparse_coo
    probe_of = probes.get
    for gi, group in enumerate(param_groups):
        plan = GroupPlan([], [], [])
        result.append(plan)
        params = group["params"]
        if group[FROZEN]:
            plan.idle_with_grad.extend(p for p in params if p.grad is not None)
            continue
        frozen_ids = frozen_params(group)
        lazy = group[LAZY]
        rows = lazy == ROWS
        active, idle, _ = plan
        add = active.append
        for p in params:
            grad = p.grad
            if grad is None:
                continue
            if frozen_ids and id(p) in frozen_ids:
                idle.append(p)
                continue
            if (
                rows
                and grad.dim() > 1
                and (grad.layout is strided or grad.layout is sparse)
                and type(grad) is Tensor
            ):
                by_rows.append((gi, p, grad))
                continue
            if lazy:  # _surely_nonzero and _readable, inlined: this runs for every parameter every step
                probe = probe_of(grad.dtype)
                if not (
                    probe is not None
                    and type(grad) is Tensor
                    and grad.is_cpu
                    and grad.layout is strided
                    and grad.numel()
                    and (ptr := grad.data_ptr()) != (offset := grad.storage_offset()) * (size := probe[2])
                    and (offset + 1) * size <= grad.untyped_storage().nbytes()
                    and probe[0](ptr).value & probe[1]
                ):
                    unsure.append((gi, p, grad))
                    continue
            add(p)
    late: set[int] = set()
    if unsure:
        with torch.no_grad():
            flags = _full_flags([u[2] for u in unsure])
        for (gi, p, _), flag in zip(unsure, flags):
            if flag:
                result[gi].active.append(p)
                late.add(gi)
            else:
                result[gi].idle_with_grad.append(p)
    for gi, p, grad in by_rows:
        with torch.no_grad():
            rows_active, grad_rows = touched_rows(grad)
        if not rows_active.numel():
            result[gi].idle_with_grad.append(p)
        elif rows_active.numel() == grad.shape[0] and grad_rows is None:
            result[gi].active.append(p)
            late.add(gi)
        else:  # a sparse grad goes to the rows path even when every row is active: torch never sees it
            result[gi].rows.append((p, rows_active, grad_rows))
    if late:
        for gi in late:  # keep group order, as torch would visit them
            order = {id(p): i for i, p in enumerate(param_groups[gi]["params"])}
            result[gi].active.sort(key=lambda p: order[id(p)])
    return result


def fill_flags(group: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Give a param group safeopt's keys where it lacks them (a torch state_dict, a new group)."""
    group.setdefault(FROZEN, False)
    group.setdefault(LAZY, defaults.get(LAZY, True))
    group.setdefault(FROZEN_PARAMS, [])


def with_flags(groups: list[dict[str, Any]], defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """The groups as a step reads them: ``groups`` itself when every group has safeopt's keys.

    A group that reached the optimizer behind safeopt's back (torch's ``add_param_group`` or
    ``load_state_dict`` called on the optimizer, or on the one ``wrap()`` wraps) is read as a
    copy with the defaults filled in and checked; the group itself is not changed.
    """
    if all(FROZEN_PARAMS in group and LAZY in group and FROZEN in group for group in groups):
        return groups
    out = []
    for i, group in enumerate(groups):
        if FROZEN_PARAMS not in group or LAZY not in group or FROZEN not in group:
            group = dict(group)
            fill_flags(group, defaults)
            check_flags(group, len(group["params"]), f"param group {i}")
        out.append(group)
    return out


def check_lazy(value: Any) -> None:
    if not isinstance(value, bool) and value != ROWS:
        raise ValueError(f'Invalid lazy value: {value!r}; expected True, False or "rows"')


def check_flags(group: dict[str, Any], n_params: int | None, where: str) -> None:
    """Raise ValueError if a param group carries malformed safeopt keys.

    ``n_params`` bounds ``frozen_params``; None skips that check (params not known yet).
    """
    if LAZY in group:
        check_lazy(group[LAZY])
    if FROZEN in group and not isinstance(group[FROZEN], bool):
        raise ValueError(f"Invalid frozen value in {where}: {group[FROZEN]!r}; expected True or False")
    if n_params is None:
        return
    positions = group.get(FROZEN_PARAMS, [])
    if not isinstance(positions, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_params for i in positions
    ):
        raise ValueError(
            f"Invalid frozen_params in {where}: {positions!r}; expected positions in "
            f"range({n_params}) of the group's params (use freeze() instead of setting it)"
        )
