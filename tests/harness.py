"""Helpers shared by the tests: parameters, grads, snapshots, bit-identity and the torch reference.

The reference for a safeopt step is a torch optimizer over clones of the same
parameters whose inactive parameters have ``grad=None``: by the contract, a
safeopt step equals a torch step on only the active parameters.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

GRAD_KINDS = ("none", "zero", "negzero", "dense", "partial", "subnormal", "nan", "inf")
ZERO_KINDS = ("zero", "negzero")


def make_params(
    shapes: Sequence[tuple[int, ...]],
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: str = "cpu",
    requires_grad: bool = True,
) -> list[nn.Parameter]:
    """Random parameters. ``differentiable=True`` cases need ``requires_grad=False``: torch's
    differentiable step updates leaves in place under autograd."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        real = dtype.to_real() if dtype.is_complex else dtype
        value = torch.randn(shape, generator=gen, dtype=torch.float64)
        if dtype.is_complex:
            value = torch.complex(value, torch.randn(shape, generator=gen, dtype=torch.float64))
        out.append(
            nn.Parameter(
                value.to(dtype if dtype.is_complex else real).to(device), requires_grad=requires_grad
            )
        )
    return out


def make_grad(p: Tensor, kind: str, gen: torch.Generator) -> Tensor | None:
    """A grad for ``p`` of the given kind (see GRAD_KINDS)."""
    if kind == "none":
        return None
    if kind == "zero":
        return torch.zeros(p.shape, dtype=p.dtype, device=p.device)
    if kind == "negzero":
        return torch.full(p.shape, -0.0, dtype=p.dtype, device=p.device)
    dense = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    if p.dtype.is_complex:
        dense = torch.complex(dense, torch.randn(p.shape, generator=gen, dtype=torch.float64))
    dense = dense.to(p.dtype).to(p.device)
    if kind == "dense":
        return dense
    if kind == "partial":  # about half the elements zero, at least one nonzero when p is non-empty
        mask = torch.rand(p.shape, generator=gen) < 0.5
        out = torch.where(mask.to(p.device), dense, torch.zeros_like(dense))
        if out.numel():
            out.view(-1)[0] = 1
        return out
    if kind == "subnormal":
        tiny = torch.finfo(p.dtype.to_real() if p.dtype.is_complex else p.dtype).smallest_normal / 4
        out = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
        if out.numel():
            out.view(-1)[-1] = tiny
        return out
    if kind in ("nan", "inf"):
        out = dense.clone()
        if out.numel():
            out.view(-1)[0] = float(kind)
        return out
    raise ValueError(kind)


def expected_active(grad: Tensor | None, frozen: bool, lazy: bool = True) -> bool:
    """The rule, written independently of safeopt: what the contract says."""
    if frozen or grad is None:
        return False
    if not lazy:
        return True
    return (
        any(v != 0 for v in torch.view_as_real(grad).flatten().tolist())
        if grad.is_complex()
        else any(v != 0 for v in grad.flatten().tolist())
    )


def clone_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()}


def snapshot(
    opt: torch.optim.Optimizer, params: Sequence[Tensor]
) -> list[tuple[Tensor, Tensor | None, dict[str, Any]]]:
    return [
        (p.detach().clone(), None if p.grad is None else p.grad.clone(), clone_state(opt.state.get(p, {})))
        for p in params
    ]


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def from_bits(bits: int, dtype: torch.dtype) -> Tensor:
    """One element of ``dtype`` (its real part's dtype, for a complex one) with the given bits."""
    real = dtype.to_real() if dtype.is_complex else dtype
    size = torch.empty((), dtype=real).element_size()
    signed = bits - (1 << (8 * size)) if bits >> (8 * size - 1) else bits
    return torch.tensor([signed], dtype=_INT_OF_SIZE[size]).view(real)


def roundtrip(state_dict: dict[str, Any], *, weights_only: bool = True) -> dict[str, Any]:
    """A checkpoint: torch.save into memory and torch.load back."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=weights_only)


def bits(t: Tensor) -> Tensor:
    """The tensor's bits as integers, so that -0.0 != 0.0 and NaNs compare by payload."""
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.is_floating_point():
        t = t.view(_INT_OF_SIZE[t.element_size()])
    return t


def bit_equal(a: Any, b: Any) -> bool:
    """Bit-identity: same dtype, shape and device, and ``torch.equal`` on the raw bits."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device)
            and torch.equal(bits(a), bits(b))
        )
    return bool(a == b)


def assert_state_equal(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    assert set(a) == set(b), f"{what}: state keys {sorted(a)} != {sorted(b)}"
    for key, value in a.items():
        assert bit_equal(value, b[key]), f"{what}: state[{key!r}] differs: {value} vs {b[key]}"


def assert_unchanged(
    before: Sequence[tuple[Tensor, Tensor | None, dict[str, Any]]],
    opt: torch.optim.Optimizer,
    params: Sequence[Tensor],
    which: Sequence[int],
    what: str = "",
) -> None:
    """Parameters at ``which`` and their grads and state are bit-identical to ``before``."""
    for i in which:
        value, grad, state = before[i]
        p = params[i]
        assert bit_equal(p.detach(), value), f"{what} param {i} moved"
        assert (p.grad is None) == (grad is None) and (grad is None or bit_equal(p.grad, grad)), (
            f"{what} grad {i} changed"
        )
        now = opt.state.get(p, {})
        if state:
            assert_state_equal(now, state, f"{what} param {i}")
        else:
            assert_fresh(now, p, f"{what} param {i}")


def assert_fresh(state: dict[str, Any], p: Tensor, what: str) -> None:
    """State that no update has touched: step 0, and per-element buffers filled with one constant
    (zeros for Adam's moments, ``initial_accumulator_value`` for Adagrad), whatever the grad was."""
    for key, v in state.items():
        if key == "step":
            assert float(v) == 0, f"{what}: fresh state has step {v}"
        elif isinstance(v, Tensor) and v.shape == p.shape and v.numel() > 1:
            assert bit_equal(v, torch.full_like(v, v.flatten()[0].item())), (
                f"{what}: state[{key!r}] was updated"
            )


def reference_step(
    ref_opt: torch.optim.Optimizer,
    ref_params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    active: Sequence[bool],
    copy: Callable[[Tensor], Tensor] = Tensor.clone,
) -> None:
    """Step torch's optimizer with grads only on the active parameters (``copy`` of each:
    ``clone`` by default, which makes a non-dense grad contiguous)."""
    for p, g, a in zip(ref_params, grads, active):
        p.grad = copy(g) if (a and g is not None) else None
    if isinstance(ref_opt, torch.optim.SGD) and any(
        g["fused"] and g["momentum"] for g in ref_opt.param_groups
    ):
        # torch's fused SGD raises a TypeError when only some parameters have a momentum
        # buffer; step those that have one and those that do not as two torch steps.
        stepping = [p for p in ref_params if p.grad is not None]
        started = {id(p) for p in stepping if ref_opt.state.get(p, {}).get("momentum_buffer") is not None}
        if 0 < len(started) < len(stepping):
            held = {id(p): p.grad for p in stepping}
            for first in (True, False):
                for p in stepping:
                    p.grad = held[id(p)] if (id(p) in started) == first else None
                ref_opt.step()
            for p in stepping:
                p.grad = held[id(p)]
            return
    ref_opt.step()


def assert_matches_reference(
    opt: torch.optim.Optimizer,
    params: Sequence[Tensor],
    ref_opt: torch.optim.Optimizer,
    ref_params: Sequence[Tensor],
    which: Sequence[int],
    what: str = "",
) -> None:
    for i in which:
        assert bit_equal(params[i].detach(), ref_params[i].detach()), f"{what} param {i} differs from torch"
        mine, ref = opt.state.get(params[i], {}), ref_opt.state.get(ref_params[i], {})
        if ref:
            assert_state_equal(mine, ref, f"{what} param {i}")
        else:  # torch never stepped it; safeopt may hold torch's fresh allocation
            assert_fresh(mine, params[i], f"{what} param {i}")


def step_against_reference(
    opt: torch.optim.Optimizer,
    params: Sequence[Tensor],
    ref_opt: torch.optim.Optimizer,
    ref_params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    active: Sequence[bool],
    what: str,
) -> None:
    """One step of ``opt`` with ``grads`` and of torch's ``ref_opt`` with only the active ones:
    the idle parameters and their state unchanged, the active ones as torch's."""
    for p, g in zip(params, grads):
        p.grad = g
    before = snapshot(opt, params)
    opt.step()
    reference_step(ref_opt, ref_params, grads, active)
    assert_unchanged(before, opt, params, [i for i, a in enumerate(active) if not a], what)
    assert_matches_reference(opt, params, ref_opt, ref_params, [i for i, a in enumerate(active) if a], what)


@contextlib.contextmanager
def rows_stepped_either_way(data: Any) -> Iterator[None]:
    """Draw how ``lazy="rows"`` steps rows for the rest of the example: in place (views of the
    parameter, as for a few long runs of rows) or gathered into buckets."""
    from hypothesis import strategies as st

    from safeopt import _rows

    in_place = data.draw(st.booleans(), label="rows stepped in place when they can be")
    saved, _rows._RUN_BYTES = _rows._RUN_BYTES, (1 if in_place else 2**62)
    try:
        yield
    finally:
        _rows._RUN_BYTES = saved
