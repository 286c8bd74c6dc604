"""The twins are torch optimizers to the tools that drive optimizers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import safeopt


@pytest.mark.parametrize("cls", [safeopt.Adam, safeopt.AdamW, safeopt.SGD], ids=lambda c: c.__name__)
def test_isinstance_and_lr_schedulers(cls: type) -> None:
    p = nn.Parameter(torch.ones(2))
    opt = cls([p], lr=1.0)
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, cls.__mro__[3])
    schedulers = torch.optim.lr_scheduler.ChainedScheduler(
        [torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5), torch.optim.lr_scheduler.ExponentialLR(opt, 0.5)]
    )
    for _ in range(2):
        p.grad = torch.ones(2)
        opt.step()
        schedulers.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / 16)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_grad_scaler_skips_inf_steps_and_keeps_the_lazy_rule(fused: bool) -> None:
    torch.manual_seed(0)
    used, idle = nn.Linear(3, 1), nn.Linear(3, 1)
    opt = safeopt.Adam([*used.parameters(), *idle.parameters()], lr=0.1, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    x = torch.randn(4, 3)
    for p in idle.parameters():
        p.grad = torch.zeros_like(p)
    before_idle = [p.detach().clone() for p in idle.parameters()]

    scaler.scale(used(x).sum()).backward()
    scaler.step(opt)
    scaler.update()
    stepped = [p.detach().clone() for p in used.parameters()]
    assert all(int(opt.state[p]["step"]) == 1 for p in used.parameters())

    opt.zero_grad(set_to_none=False)
    used.weight.grad = torch.full_like(used.weight, float("inf"))
    scaler.step(opt)  # inf found: the step is skipped
    scaler.update()
    assert all(torch.equal(p, s) for p, s in zip(used.parameters(), stepped))
    assert all(torch.equal(p, b) for p, b in zip(idle.parameters(), before_idle))
    assert all(int(opt.state[p]["step"]) == 0 for p in idle.parameters())
