"""amsgrad and state without ``max_exp_avg_sq``: which state the eager step drops as fresh.

Only torch's initial state (``step`` 0, zero moments) of a parameter updated in this step, in a
group with ``amsgrad`` on, is dropped and made anew (the same bits as torch's state for a new
parameter); any other state is torch's to use or to raise on, and the walk reads nothing from
the device for the state of other groups.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import safeopt
from harness import assert_state_equal, bit_equal
from safeopt._bench import count_launches


def two(seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(3, generator=gen)) for _ in range(2)]


def warm_restarted(cls: type, groups: Any) -> tuple[list[nn.Parameter], Any]:
    """Three steps, every step count set back to 0 (moments kept), one more step."""
    params = two()
    opt = cls(groups(params), lr=0.1)
    for i in range(3):
        for p in params:
            p.grad = torch.full_like(p, 0.5 + i)
        opt.step()
    for p in params:
        opt.state[p]["step"].zero_()
    for p in params:
        p.grad = torch.full_like(p, 2.0)
    opt.step()
    return params, opt


def test_a_step_reset_in_a_group_without_amsgrad_keeps_its_moments() -> None:
    """A warm restart (step counts set to 0, moments kept) with one group with amsgrad and one
    without: the group without amsgrad is stepped on its moments, as torch's step does. Before the
    fix its state (no ``max_exp_avg_sq``, step 0) was dropped as fresh: other bits than torch's."""

    def groups(ps: list[nn.Parameter]) -> Any:
        return [{"params": [ps[0]], "amsgrad": True}, {"params": [ps[1]], "amsgrad": False}]

    theirs, ref = warm_restarted(torch.optim.Adam, groups)
    mine, opt = warm_restarted(safeopt.Adam, groups)
    for j in range(2):
        assert bit_equal(mine[j].detach(), theirs[j].detach()), f"param {j}"
        for key, value in ref.state[theirs[j]].items():
            assert bit_equal(opt.state[mine[j]][key], value), f"param {j}: {key}"


def test_real_state_without_max_exp_avg_sq_in_an_amsgrad_group_raises_torchs_error() -> None:
    """State with built-up moments and step reset to 0, in a group whose amsgrad was switched on
    since: torch raises ``KeyError: 'max_exp_avg_sq'``, and so does safeopt (before the fix it
    dropped the state as fresh and stepped silently). Nothing is changed."""
    for cls in (torch.optim.Adam, safeopt.Adam):
        params = two()
        opt = cls(params, lr=0.1)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        for p in params:
            opt.state[p]["step"].zero_()
        opt.param_groups[0]["amsgrad"] = True
        before = [p.detach().clone() for p in params]
        with pytest.raises(KeyError, match="max_exp_avg_sq"):
            opt.step()
        if cls is safeopt.Adam:
            assert all(bit_equal(p.detach(), b) for p, b in zip(params, before))
            assert all("exp_avg" in opt.state[p] for p in params)


@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
def test_an_amsgrad_group_beside_another_reads_nothing_more_than_torch(foreach: bool) -> None:
    """One group with amsgrad, one without, several steps, every parameter active: safeopt's step
    reads from the device what torch's step reads, nothing more (before the fix it read the step
    count of every state entry without ``max_exp_avg_sq``, each step: a sync each on CUDA)."""

    def run(cls: type) -> list[int]:
        gen = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(3, generator=gen)) for _ in range(4)]
        groups = [{"params": params[:2], "amsgrad": True}, {"params": params[2:], "amsgrad": False}]
        opt = cls(groups, lr=0.1, foreach=foreach, **({"lazy": False} if cls is safeopt.Adam else {}))
        reads = []
        for i in range(4):
            for p in params:
                p.grad = torch.full_like(p, 0.5 + i)
            reads.append(count_launches(opt.step).reads)
        return reads

    assert run(safeopt.Adam) == run(torch.optim.Adam)


@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam], ids=["AdamW", "Adam"])
def test_amsgrad_switched_on_after_an_idle_capturable_step(cls: type) -> None:
    """fused and capturable: a parameter idle in a step (zero grad: torch's kernel made its state
    and skipped it), then ``amsgrad`` switched on, then its first update: torch's class holding
    only the active parameters makes its state at that update, amsgrad included, and so does
    safeopt's. Before the fix the capturable step raised ``KeyError: 'max_exp_avg_sq'``."""
    safe = getattr(safeopt, cls.__name__)
    params, ref_params = two(), two()
    opt = safe(params, lr=0.1, fused=True, capturable=True)
    ref = cls(ref_params[1:], lr=0.1, fused=True, capturable=True)
    params[0].grad, params[1].grad = torch.ones(3), torch.zeros(3)
    opt.step()
    for o in (opt, ref):
        o.param_groups[0]["amsgrad"] = True
    params[0].grad, params[1].grad = None, torch.full((3,), 0.7)
    ref_params[1].grad = torch.full((3,), 0.7)
    opt.step()
    ref.step()
    assert bit_equal(params[1].detach(), ref_params[1].detach())
    assert_state_equal(opt.state[params[1]], ref.state[ref_params[1]], "the first update")


def test_real_state_without_max_exp_avg_sq_in_a_capturable_step_raises_torchs_error() -> None:
    """fused and capturable, state an update used, then ``amsgrad`` switched on: torch raises
    ``KeyError: 'max_exp_avg_sq'``, and so does safeopt; nothing is changed."""
    for cls in (torch.optim.AdamW, safeopt.AdamW):
        params = two()
        opt = cls(params, lr=0.1, fused=True, capturable=True)
        for p in params:
            p.grad = torch.ones(3)
        opt.step()
        opt.param_groups[0]["amsgrad"] = True
        before = [p.detach().clone() for p in params]
        with pytest.raises(KeyError, match="max_exp_avg_sq"):
            opt.step()
        assert all(bit_equal(p.detach(), b) for p, b in zip(params, before))


def test_under_capture_state_without_max_exp_avg_sq_is_refused_with_the_way_out() -> None:
    """Under CUDA-graph capture no host read may decide such state: the step raises, naming the
    way out (one step outside capture), and drops nothing. (Capture needs CUDA; the decision is
    called here as the capturable step calls it while capturing.)"""
    from safeopt import _fresh

    params = two()
    opt = safeopt.AdamW(params, lr=0.1, fused=True, capturable=True)
    params[0].grad, params[1].grad = torch.ones(3), torch.zeros(3)
    opt.step()
    opt.param_groups[0]["amsgrad"] = True
    entry = opt.state[params[1]]
    with pytest.raises(RuntimeError, match="outside capture"):
        _fresh.drop_unstarted(opt, opt.param_groups, [params[1:]], capturing=True)
    assert opt.state[params[1]] is entry
    assert _fresh.drop_unstarted(opt, opt.param_groups, [params[1:]], capturing=False) == [(params[1], entry)]


@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam], ids=["AdamW", "Adam"])
def test_a_parameter_updated_before_amsgrad_and_idle_after_it_is_left_alone_capturable(cls: type) -> None:
    """fused and capturable: a parameter updated while ``amsgrad`` was off, then idle (zero grad)
    after it was switched on. torch's class holding only the active parameters never sees it and
    steps the others; safeopt's capturable step must too, leaving it and its state as they are.
    Before the fix the idle parameter stayed in torch's kernel call, whose ``_init_group`` raised
    ``KeyError: 'max_exp_avg_sq'`` on its state."""
    safe = getattr(safeopt, cls.__name__)
    params, ref_params = two(), two()
    opt = safe(params, lr=0.1, fused=True, capturable=True)
    ref = cls(ref_params, lr=0.1, fused=True, capturable=True)
    params[0].grad, params[1].grad = None, torch.ones(3)
    ref_params[0].grad, ref_params[1].grad = None, torch.ones(3)
    opt.step()
    ref.step()
    for o in (opt, ref):
        o.param_groups[0]["amsgrad"] = True
    params[0].grad, params[1].grad = torch.ones(3), torch.zeros(3)
    ref_params[0].grad, ref_params[1].grad = torch.ones(3), None
    idle_before = {k: v.clone() for k, v in opt.state[params[1]].items()}
    value_before = params[1].detach().clone()
    opt.step()
    ref.step()
    assert bit_equal(params[0].detach(), ref_params[0].detach())
    assert bit_equal(params[1].detach(), value_before)
    assert set(opt.state[params[1]]) == set(idle_before)
    assert all(bit_equal(opt.state[params[1]][k], v) for k, v in idle_before.items())
    assert torch.equal(params[1].grad, torch.zeros(3))
