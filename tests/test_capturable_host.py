"""The host time of the capturable step (issue 22): what it makes per parameter, and that it stays exact.

The capturable step hands each parameter's kernel call a 0-d ``found_inf`` of its own. Those are
views of one flag buffer per device, made once and rewritten by each step
(``safeopt._device.Flags``), not a tensor object per parameter and step. The tests here count the
tensors a step makes (under a ``TorchDispatchMode``), check that the flags are the same objects
from step to step, and that the step stays bit-identical to torch's on the active parameters while
the flags are rewritten: grads turning zero and back, ``-0.0``, subnormal, NaN and inf grads,
GradScaler's ``found_inf``, a buffer that grows, and grads of two dtypes.
"""

from __future__ import annotations

import contextlib
import copy
import gc
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import harness
import safeopt


class _Made(TorchDispatchMode):
    """The tensors the aten ops of a block return, views included."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors = 0
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        made = len(out) if isinstance(out, (list, tuple)) else int(isinstance(out, torch.Tensor))
        self.tensors += made
        self.by_op[str(func)] = self.by_op.get(str(func), 0) + made
        return out


def _optimizer(
    shapes: list[tuple[int, ...]], **kwargs: Any
) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    params = harness.make_params(shapes)
    opt = safeopt.AdamW(params, lr=1e-2, weight_decay=0.01, fused=True, capturable=True, **kwargs)
    return opt, params


def test_capturable_step_makes_no_flag_tensors_per_parameter() -> None:
    """Besides what torch's kernels need (the norms of the grads, one per grad), a step makes a
    constant number of tensors. Before: two tensor objects per parameter and step (its
    ``found_inf`` and one minus it, by ``unbind``), as much host time as the norms."""
    n = 40
    opt, params = _optimizer([(3,)] * n)
    gen = torch.Generator().manual_seed(0)
    for i, p in enumerate(params):
        p.grad = torch.zeros_like(p) if i % 3 == 0 else torch.randn(p.shape, generator=gen)
    opt.step()  # state and flag buffers made
    made = _Made()
    with made:
        opt.step()
    norms = made.by_op.get("aten._foreach_norm.Scalar", 0)
    assert norms == n, made.by_op
    assert made.tensors - norms <= 12, f"{made.tensors - norms} tensors besides the norms: {made.by_op}"


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[torch.Tensor, float]]]:
    """Each step's found_inf arguments of torch's fused AdamW kernel, with their values at the call."""
    steps: list[list[tuple[torch.Tensor, float]]] = []
    kernel = torch._fused_adamw_

    def recorded(*args: Any, **kwargs: Any) -> None:
        skip = kwargs["found_inf"]
        steps[-1].append((skip, float(skip)))
        kernel(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", recorded)
    return steps


def test_capturable_flags_are_made_once_and_rewritten_each_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The found_inf of each parameter's call is the same tensor object at every step, and holds
    that step's decision when its call is made. Before: new tensors at every step."""
    opt, params = _optimizer([(4,)] * 6)
    steps = _recording(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        for i, p in enumerate(params):
            p.grad = torch.zeros_like(p) if (i + step) % 2 else torch.randn(p.shape, generator=gen)
        steps.append([])
        opt.step()
        assert [value for _, value in steps[-1]] == [float((i + step) % 2) for i in range(6)]
    first = [skip for skip, _ in steps[0]]
    for later in steps[1:]:
        assert all(a is b for a, b in zip(first, (skip for skip, _ in later)))


KINDS = ["dense", "zero", "negzero", "subnormal", "nan", "inf", "partial", "none"]


@pytest.mark.parametrize("amsgrad", [False, True])
def test_capturable_step_equals_torch_while_the_flags_are_rewritten(amsgrad: bool) -> None:
    """Over steps in which each parameter's grad kind rotates (zero and -0.0 idle; subnormal, NaN,
    inf, partial and dense active; None left out): the active parameters equal torch's on an
    optimizer holding only them, the idle ones are untouched, step counts included."""
    shapes = [(5,), (2, 3), (4,), (3,), (6,), (1,), (2, 2), (7,)]
    opt, params = _optimizer(shapes, amsgrad=amsgrad)
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    ref = torch.optim.AdamW(
        ref_params, lr=1e-2, weight_decay=0.01, fused=True, capturable=True, amsgrad=amsgrad
    )
    gen = torch.Generator().manual_seed(3)
    for step in range(2 * len(KINDS)):
        kinds = [KINDS[(i + step) % len(KINDS)] for i in range(len(params))]
        grads = [harness.make_grad(p, kind, gen) for p, kind in zip(params, kinds)]
        active = [kind not in ("zero", "negzero", "none") for kind in kinds]
        for p, g in zip(params, grads):
            p.grad = g
        before = harness.snapshot(opt, params)
        opt.step()
        harness.reference_step(ref, ref_params, grads, active)
        idle = [i for i, a in enumerate(active) if not a]
        harness.assert_unchanged(before, opt, params, idle, f"step {step} idle")
        which = [i for i, a in enumerate(active) if a]
        harness.assert_matches_reference(opt, params, ref, ref_params, which, f"step {step} active")


def test_capturable_flags_with_a_grad_scaler_found_inf_turning_on_and_off() -> None:
    """GradScaler's found_inf written into the same flags: 1 skips every parameter (counts
    included), 0 steps the active ones, step after step."""
    opt, params = _optimizer([(3,), (4,), (2,)])
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    ref = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.01, fused=True, capturable=True)
    gen = torch.Generator().manual_seed(0)
    for o in (opt, ref):
        o.grad_scale = torch.tensor(1.0)  # type: ignore[attr-defined]  # GradScaler's attributes
    for step, inf in enumerate([0.0, 1.0, 0.0, 1.0, 0.0]):
        grads = [
            torch.randn(p.shape, generator=gen) if i != step % 3 else torch.zeros_like(p)
            for i, p in enumerate(params)
        ]
        active = [i != step % 3 for i in range(3)]
        for p, g in zip(params, grads):
            p.grad = g
        before = harness.snapshot(opt, params)
        opt.found_inf = torch.tensor(inf)  # type: ignore[attr-defined]  # GradScaler's attribute
        opt.step()
        if inf:
            harness.assert_unchanged(before, opt, params, range(3), f"step {step}, found_inf 1")
            continue
        harness.reference_step(ref, ref_params, grads, active)
        harness.assert_unchanged(before, opt, params, [step % 3], f"step {step} idle")
        harness.assert_matches_reference(opt, params, ref, ref_params, [i for i in range(3) if active[i]])


def test_capturable_flags_grow_with_a_param_group_added() -> None:
    """A step with more parameters whose grad may be zero than the flag buffer holds makes a
    larger one; the result is torch's either way."""
    opt, params = _optimizer([(3,), (4,)])
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    ref = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.01, fused=True, capturable=True)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        if step == 1:
            more = harness.make_params([(2,), (5,), (3,)], seed=1)
            opt.add_param_group({"params": more})
            ref_more = [nn.Parameter(p.detach().clone()) for p in more]
            ref.add_param_group({"params": ref_more})
            params, ref_params = params + more, ref_params + ref_more
        grads = [
            torch.randn(p.shape, generator=gen) if i % 2 == step % 2 else torch.zeros_like(p)
            for i, p in enumerate(params)
        ]
        active = [i % 2 == step % 2 for i in range(len(params))]
        harness.step_against_reference(opt, params, ref, ref_params, grads, active, f"step {step}")


def test_capturable_flags_of_two_dtypes() -> None:
    """Grads of two dtypes are decided per dtype (no shared buffer); the result is torch's."""
    params = harness.make_params([(3,), (4,)]) + harness.make_params([(2,), (5,)], dtype=torch.float64)
    opt = safeopt.AdamW(params, lr=1e-2, fused=True, capturable=True)
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    ref = torch.optim.AdamW(ref_params, lr=1e-2, fused=True, capturable=True)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        grads = [
            torch.randn(p.shape, generator=gen, dtype=p.dtype) if (i + step) % 2 else torch.zeros_like(p)
            for i, p in enumerate(params)
        ]
        active = [bool((i + step) % 2) for i in range(4)]
        harness.step_against_reference(opt, params, ref, ref_params, grads, active, f"step {step}")


def test_capturable_kernel_failing_in_a_later_group_keeps_the_counts_not_reached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three groups (one ``lazy=False``, whose call is shared): when the call of the second
    parameter of the last group raises, every parameter stepped before keeps its update and its
    advanced count, and that parameter and the ones after it are as they were, counts included."""
    params = harness.make_params([(3,), (4,), (2,), (5,), (3,), (2,), (4,)])
    opt = safeopt.AdamW(
        [
            {"params": params[:2], "lazy": False},
            {"params": params[2:4]},
            {"params": params[4:]},
        ],
        lr=1e-2,
        fused=True,
        capturable=True,
    )
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = harness.snapshot(opt, params)
    kernel = torch._fused_adamw_
    calls: list[int] = []

    def fifth_fails(*args: Any, **kwargs: Any) -> None:
        calls.append(len(args[0]))
        if len(calls) == 5:  # the shared call, two of group 1, one of group 2, then this one
            raise RuntimeError("kernel failed")
        kernel(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", fifth_fails)
    with pytest.raises(RuntimeError, match="kernel failed"):
        opt.step()
    monkeypatch.undo()
    assert calls == [2, 1, 1, 1, 1]
    harness.assert_unchanged(before, opt, params, [5, 6], "from the failing call on")
    for i in range(5):
        assert float(opt.state[params[i]]["step"]) == 2.0, f"param {i}"
        assert not harness.bit_equal(params[i].detach(), before[i][0]), f"param {i} not stepped"


class _ComparedAdamW(torch.optim.AdamW):
    """A subclass with an ``__eq__`` of its own, which makes it unhashable."""

    def __eq__(self, other: object) -> bool:
        return self is other


def test_capturable_step_of_an_unhashable_optimizer() -> None:
    """The flags are kept by the optimizer's identity, also for one that cannot be a dict key, with
    the same result as torch."""
    params = harness.make_params([(3,), (4,)])
    opt = safeopt.wrap(_ComparedAdamW(params, lr=1e-2, fused=True, capturable=True))
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    ref = torch.optim.AdamW(ref_params, lr=1e-2, fused=True, capturable=True)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        grads = [
            torch.randn(p.shape, generator=gen) if i != step % 2 else torch.zeros_like(p)
            for i, p in enumerate(params)
        ]
        active = [i != step % 2 for i in range(2)]
        for p, g in zip(params, grads):
            p.grad = g
        before = harness.snapshot(opt, params)
        opt.step()
        harness.reference_step(ref, ref_params, grads, active)
        harness.assert_unchanged(before, opt, params, [step % 2], f"step {step}")
        harness.assert_matches_reference(opt, params, ref, ref_params, [1 - step % 2], f"step {step}")


_MODES = {
    "plain": contextlib.nullcontext,
    "inference": torch.inference_mode,
    "no_grad": torch.no_grad,
    "enable_grad": torch.enable_grad,
}


@pytest.mark.parametrize(
    "modes",
    [
        ("inference", "plain", "plain"),
        ("plain", "inference", "plain"),
        ("inference", "no_grad", "enable_grad"),
        ("no_grad", "inference", "enable_grad"),
    ],
)
def test_capturable_flags_made_under_inference_mode_serve_later_steps(modes: tuple[str, ...]) -> None:
    """The flag buffers are made at an optimizer's first capturable step, whatever grad mode it runs
    in: made under ``torch.inference_mode()`` they were inference tensors, and every later step
    outside it raised "Inplace update to inference tensor outside InferenceMode". Each step here
    equals torch's (state loaded first, as torch's own step under inference mode needs)."""
    shapes = [(3,), (4,), (2,)]
    params = harness.make_params(shapes)
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    src = torch.optim.Adam(
        [nn.Parameter(p.detach().clone()) for p in params], lr=0.1, fused=True, capturable=True
    )
    for p in src.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    src.step()
    opt = safeopt.Adam(params, lr=0.1, fused=True, capturable=True)
    ref = torch.optim.Adam(ref_params, lr=0.1, fused=True, capturable=True)
    opt.load_state_dict(copy.deepcopy(src.state_dict()))  # loaded, torch's tensors are shared
    ref.load_state_dict(copy.deepcopy(src.state_dict()))
    gen = torch.Generator().manual_seed(1)
    for step, mode in enumerate(modes):
        grads = [
            torch.zeros_like(p) if i == step else torch.randn(p.shape, generator=gen)
            for i, p in enumerate(params)
        ]
        active = [i != step for i in range(len(params))]
        for p, g in zip(params, grads):
            p.grad = g
        before = harness.snapshot(opt, params)
        with _MODES[mode]():
            opt.step()
        harness.reference_step(ref, ref_params, grads, active)
        harness.assert_unchanged(before, opt, params, [step], f"step {step} ({mode})")
        harness.assert_matches_reference(
            opt, params, ref, ref_params, [i for i, a in enumerate(active) if a], f"step {step} ({mode})"
        )


def test_capturable_kernel_failing_in_a_group_leaves_a_later_lazy_false_group_alone() -> None:
    """The groups' kernel calls are made group by group, as torch's step makes them: a parameter
    of the first group failing (a float64 grad for a float32 parameter) leaves the later
    ``lazy=False`` group untouched, counts included, as torch leaves a group it never reached.
    Before, the calls shared by a group (``lazy=False``) ran before every per-parameter call."""
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(3, generator=gen)) for _ in range(4)]
    opt = safeopt.Adam(
        [{"params": params[:2]}, {"params": params[2:], "lazy": False}], lr=0.1, fused=True, capturable=True
    )
    for p in params:
        p.grad = torch.randn(3, generator=gen)
    opt.step()
    for p in params:
        p.grad = torch.randn(3, generator=gen)
    params[1].grad.data = params[1].grad.data.double()
    before = harness.snapshot(opt, params)
    with pytest.raises(RuntimeError, match="expected scalar type Float but found Double"):
        opt.step()
    assert not harness.bit_equal(params[0].detach(), before[0][0]), "param 0 not stepped"
    assert float(opt.state[params[0]]["step"]) == 2.0
    harness.assert_unchanged(before, opt, params, [1, 2, 3], "from the failing call on")


def test_capturable_kernel_calls_are_made_group_by_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shared (``lazy=False``) and per-parameter calls interleaved as the groups come."""
    params = harness.make_params([(3,), (4,), (2,), (5,), (3,), (2,)])
    opt = safeopt.AdamW(
        [
            {"params": params[:2]},
            {"params": params[2:4], "lazy": False},
            {"params": params[4:5]},
            {"params": params[5:], "lazy": False},
        ],
        lr=1e-2,
        fused=True,
        capturable=True,
    )
    for p in params:
        p.grad = torch.ones_like(p)
    kernel = torch._fused_adamw_
    order: list[list[int]] = []

    def recorded(*args: Any, **kwargs: Any) -> None:
        order.append([next(i for i, q in enumerate(params) if q is p) for p in args[0]])
        kernel(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", recorded)
    opt.step()
    assert order == [[0], [1], [2, 3], [4], [5]]


class _AllEqualAdamW(torch.optim.AdamW):
    """Equal to any other of its class, one hash for all: distinct optimizers that a dict keyed by
    the optimizer takes for one."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _AllEqualAdamW)

    def __hash__(self) -> int:
        return 0


def test_capturable_flags_of_equal_optimizers_are_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two optimizers equal by their class's ``__eq__`` keep flags of their own: one stepped in the
    middle of the other's step (as from another thread) does not rewrite the flags the other's
    remaining calls read. Before, they shared one entry: the other's idle flags skipped them."""
    params = harness.make_params([(3,), (4,), (2,)])
    others = harness.make_params([(3,), (4,), (2,)])
    opt = safeopt.wrap(_AllEqualAdamW(params, lr=1e-2, fused=True, capturable=True))
    other = safeopt.wrap(_AllEqualAdamW(others, lr=1e-2, fused=True, capturable=True))
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    ref = torch.optim.AdamW(ref_params, lr=1e-2, fused=True, capturable=True)
    for p in others:
        p.grad = torch.zeros_like(p)  # every flag of the other's step is 1
    other.step()
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    kernel = torch._fused_adamw_
    reentered: list[bool] = []

    def reentering(*args: Any, **kwargs: Any) -> None:
        if not reentered:
            reentered.append(True)
            other.step()
        kernel(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", reentering)
    opt.step()
    monkeypatch.undo()
    assert reentered
    harness.reference_step(ref, ref_params, grads, [True] * 3)
    harness.assert_matches_reference(opt, params, ref, ref_params, [0, 1, 2])


class _ChangingHashAdamW(torch.optim.AdamW):
    """A hash that changes each time it is asked for."""

    def __hash__(self) -> int:
        self.hashed = getattr(self, "hashed", 0) + 1
        return self.hashed


class _ChangingHashLazyAdamW(safeopt.AdamW):
    """The same on safeopt's class, whose eager step with idle parameters runs on a twin."""

    def __hash__(self) -> int:
        self.hashed = getattr(self, "hashed", 0) + 1
        return self.hashed


@pytest.mark.parametrize("cache", ["flags", "twins"])
def test_optimizer_caches_keep_one_entry_per_optimizer_whatever_its_hash(cache: str) -> None:
    """The flags (capturable step) and the twin (eager step with idle parameters) kept per
    optimizer are keyed by its identity: a hash that changes from step to step neither misses them
    (a new entry each step) nor leaves entries behind."""
    kept = safeopt._capturable._FLAGS if cache == "flags" else safeopt._torch_compat._TWINS
    gc.collect()
    start = len(kept)
    params = harness.make_params([(3,), (4,)])
    if cache == "flags":
        opt: torch.optim.Optimizer = safeopt.wrap(
            _ChangingHashAdamW(params, lr=1e-2, fused=True, capturable=True)
        )
    else:
        opt = _ChangingHashLazyAdamW(params, lr=1e-2, foreach=True)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        for i, p in enumerate(params):
            p.grad = torch.zeros_like(p) if i == step % 2 else torch.randn(p.shape, generator=gen)
        opt.step()
    assert len(kept) == start + 1
    del opt
    gc.collect()
    assert len(kept) == start


class _AllEqualLazyAdamW(safeopt.AdamW):
    """:class:`_AllEqualAdamW` on safeopt's class, whose eager step with idle parameters runs on a twin."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _AllEqualLazyAdamW)

    def __hash__(self) -> int:
        return 0


def test_twins_of_equal_optimizers_are_their_own() -> None:
    """Two optimizers equal by their class's ``__eq__`` each get a twin of their own (one stepping
    on the other's twin from another thread would swap its groups mid-step); each step equals
    torch's. Before, the second reused the first's twin."""
    params = harness.make_params([(3,), (4,)])
    others = harness.make_params([(3,), (4,)])
    opt = _AllEqualLazyAdamW(params, lr=1e-2, foreach=True)
    other = _AllEqualLazyAdamW(others, lr=1e-2, foreach=True)
    for p in (*params, *others):
        p.grad = torch.ones_like(p)
    params[0].grad = torch.zeros_like(params[0])
    others[1].grad = torch.zeros_like(others[1])
    opt.step()
    other.step()
    twins = safeopt._torch_compat._TWINS
    assert twins.get(opt) is not None
    assert twins.get(other) is not None
    assert twins.get(opt) is not twins.get(other)
