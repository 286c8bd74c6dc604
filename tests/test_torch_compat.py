"""The seams in safeopt/_torch_compat.py, checked against the installed torch."""

from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import cases
import harness
import safeopt
from safeopt._torch_compat import allocate_state, batches, unhooked, writes_into_grads


def test_step_hooks_run_once_even_when_torch_class_is_hooked() -> None:
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])  # torch hooks Adam.step on first use
    assert getattr(torch.optim.Adam.step, "hooked", False)
    assert unhooked(torch.optim.Adam.step) is not torch.optim.Adam.step

    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    opt = safeopt.Adam([p])
    calls: list[str] = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    handle = register_optimizer_step_pre_hook(lambda *_: calls.append("global"))
    try:
        opt.step()
    finally:
        handle.remove()
    assert calls == ["global", "pre", "post"]


@pytest.mark.parametrize("case", cases.params(where=lambda c: c.impl in ("forloop", "fused")))
def test_allocated_state_is_what_torch_allocates(case: cases.Case) -> None:
    """Keys, dtypes, devices and shapes as after torch's own first step; values untouched by it."""
    (p,) = harness.make_params([(3, 2)])
    (q,) = harness.make_params([(3, 2)])
    p.grad, q.grad = torch.zeros(3, 2), torch.ones(3, 2)
    opt, ref = case.make_torch([p]), case.make_torch([q])
    allocate_state(opt, opt.param_groups[0], [p])
    ref.step()
    mine, theirs = opt.state[p], ref.state[q]
    if not theirs or isinstance(opt, torch.optim.SGD):
        assert not mine  # SGD's buffer is created by its first update, not before
        return
    assert set(mine) <= set(theirs)
    for key in mine:
        a, b = mine[key], theirs[key]
        if isinstance(b, torch.Tensor):
            assert (a.dtype, a.device, a.shape) == (b.dtype, b.device, b.shape), key
    harness.assert_fresh(mine, p, case.id)


@pytest.mark.parametrize("case", cases.params(twins_only=True, where=lambda c: c.torch_cls is torch.optim.SGD))
def test_writes_into_grads_predicts_torch(case: cases.Case) -> None:
    """The predicate is True exactly when torch's step would change the caller's grads."""
    params = harness.make_params([(4,), (2, 2)], requires_grad=case.impl != "differentiable")
    opt = case.make_torch(params)
    changed = False
    for _ in range(2):  # the second step is the one with a momentum buffer
        grads = [torch.randn(p.shape) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        changed |= not all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    assert writes_into_grads(opt, opt.param_groups[0], params) == changed


def test_fused_sgd_still_needs_batches() -> None:
    """If torch fixes its mixed-buffer TypeError, batches() can go back to one batch."""
    a, b = harness.make_params([(3,), (3,)])
    opt = torch.optim.SGD([a, b], lr=0.1, momentum=0.9, fused=True)
    a.grad = torch.ones(3)
    opt.step()
    b.grad = torch.ones(3)
    with pytest.raises(TypeError):
        opt.step()
    assert batches(opt, opt.param_groups[0], [a, b]) == [[a], [b]]
    assert batches(opt, opt.param_groups[0], [a]) == [[a]]
