"""Parity with torch over every configuration of torch's optim_db, for the twins and for wrap().

Each case runs a fixed schedule that gives every parameter every kind of grad
(None, +0/-0 zeros, dense, partly zero, subnormal-only) and a freeze, and checks
after every step: inactive parameters, grads and state bit-identical; active
ones bit-identical to torch stepping only the active parameters.
"""

from __future__ import annotations

import pytest
import torch

import cases
import harness

SHAPES = [(3, 4), (4,), (), (2, 3, 2), (0,)]
# SCHEDULE[step][param] is the grad kind; FROZEN[step] the params frozen in that step.
SCHEDULE = [
    ["dense", "zero", "none", "dense", "dense"],
    ["zero", "dense", "dense", "negzero", "zero"],
    ["partial", "subnormal", "zero", "dense", "none"],
    ["dense", "dense", "dense", "dense", "dense"],
    ["negzero", "partial", "dense", "dense", "dense"],
]
FROZEN = [set(), set(), {3}, {0, 3}, set()]


def run_schedule(case: cases.Case, *, lazy: bool = True, dtype: torch.dtype = torch.float32) -> None:
    requires_grad = case.impl != "differentiable"
    params = harness.make_params(SHAPES, dtype, requires_grad=requires_grad)
    ref_params = [p.detach().clone().requires_grad_(requires_grad) for p in params]
    opt = case.make_safe(params, lazy=lazy)
    ref = case.make_torch(ref_params)
    gen = torch.Generator().manual_seed(1)
    for step, kinds in enumerate(SCHEDULE):
        for i in range(len(params)):
            if i in FROZEN[step]:
                opt.freeze(params[i])
            elif opt.is_frozen(params[i]):
                opt.unfreeze(params[i])
        grads = [harness.make_grad(p, kind, gen) for p, kind in zip(params, kinds)]
        for p, g in zip(params, grads):
            p.grad = g
        active = [harness.expected_active(g, i in FROZEN[step], lazy) for i, g in enumerate(grads)]
        before = harness.snapshot(opt, params)
        grad_objects = [p.grad for p in params]
        grad_values = [None if g is None else g.clone() for g in grad_objects]

        opt.step()
        harness.reference_step(ref, ref_params, grads, active)

        what = f"{case.id} step {step}"
        for i, (p, g, value) in enumerate(zip(params, grad_objects, grad_values)):
            assert p.grad is g, f"{what}: the grad of parameter {i} was replaced"
            if g is not None and value is not None:
                assert harness.bit_equal(g, value), f"{what}: the grad of parameter {i} was changed"
        harness.assert_unchanged(before, opt, params, [i for i, a in enumerate(active) if not a], what)
        harness.assert_matches_reference(
            opt, params, ref, ref_params, [i for i, a in enumerate(active) if a], what
        )


@pytest.mark.parametrize("case", cases.params())
def test_schedule_matches_torch_on_active_parameters(case: cases.Case) -> None:
    run_schedule(case)


@pytest.mark.parametrize("case", cases.params(twins_only=True))
def test_lazy_false_steps_zero_grads_like_torch(case: cases.Case) -> None:
    run_schedule(case, lazy=False)


@pytest.mark.parametrize("case", cases.params(where=lambda c: c.impl != "differentiable"))
def test_all_active_is_exactly_torch(case: cases.Case) -> None:
    """With every parameter active every step, safeopt is torch: same parameters, same state."""
    params = harness.make_params(SHAPES[:4])
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    opt, ref = case.make_safe(params), case.make_torch(ref_params)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        grads = [harness.make_grad(p, "dense", gen) for p in params]
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g, g.clone()
        opt.step()
        ref.step()
    harness.assert_matches_reference(opt, params, ref, ref_params, range(len(params)), case.id)
