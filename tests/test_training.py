"""Training patterns around the optimizer: gradient penalty, accumulation, schedulers, SWA."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import safeopt


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def batches(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(6, 4, generator=gen) for _ in range(n)]


@pytest.mark.parametrize(
    "impl", [{"foreach": False}, {"foreach": True}, {"fused": True}], ids=["forloop", "foreach", "fused"]
)
def test_gradient_penalty_matches_torch_when_everything_is_active(impl: dict) -> None:
    """A WGAN-GP-style loss: the input-gradient norm, differentiated again (create_graph=True)."""

    def train(opt_cls: type) -> nn.Module:
        net = model()
        opt = opt_cls(net.parameters(), lr=1e-2, **impl)
        for x in batches(4):
            x = x.requires_grad_()
            out = net(x).sum()
            (grad_x,) = torch.autograd.grad(out, x, create_graph=True)
            loss = out + 10 * (grad_x.norm(dim=1) - 1).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return net

    ours, theirs = train(safeopt.Adam), train(torch.optim.Adam)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))


@pytest.mark.parametrize("cls", [safeopt.AdamW, safeopt.SGD], ids=lambda c: c.__name__)
def test_gradient_accumulation_matches_torch(cls: type) -> None:
    torch_cls = {safeopt.AdamW: torch.optim.AdamW, safeopt.SGD: torch.optim.SGD}[cls]
    kwargs = {"lr": 1e-2, "momentum": 0.9} if cls is safeopt.SGD else {"lr": 1e-2}

    def train(opt_cls: type) -> nn.Module:
        net = model()
        opt = opt_cls(net.parameters(), **kwargs)
        for step, x in enumerate(batches(8)):
            (net(x).pow(2).mean() / 4).backward()  # four micro-batches per step
            if step % 4 == 3:
                opt.step()
                opt.zero_grad(set_to_none=False)
        return net

    ours, theirs = train(cls), train(torch_cls)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))


def schedulers(opt: torch.optim.Optimizer) -> list:
    return [
        torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=6),
        torch.optim.lr_scheduler.SequentialLR(
            opt,
            [
                torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=2),
                torch.optim.lr_scheduler.ExponentialLR(opt, 0.9),
            ],
            milestones=[2],
        ),
    ]


@pytest.mark.parametrize("which", range(3), ids=["StepLR", "OneCycleLR", "SequentialLR"])
@pytest.mark.parametrize("make", ["twin", "wrap"])
def test_lr_schedulers_drive_safeopt_like_torch(which: int, make: str) -> None:
    def train(lazy: bool) -> tuple[nn.Module, list[float]]:
        net = model()
        if not lazy:
            opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        elif make == "twin":
            opt = safeopt.SGD(net.parameters(), lr=0.1, momentum=0.9)
        else:
            opt = safeopt.wrap(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
        sched = schedulers(opt)[which]
        lrs = []
        for x in batches(6):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        return net, lrs

    (ours, our_lrs), (theirs, their_lrs) = train(True), train(False)
    assert our_lrs == their_lrs
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))


def test_reduce_lr_on_plateau_and_swa() -> None:
    net = model()
    opt = safeopt.Adam(net.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    swa_model = torch.optim.swa_utils.AveragedModel(net)
    swa = torch.optim.swa_utils.SWALR(opt, swa_lr=0.01, anneal_epochs=2)
    frozen_before = net[2].weight.detach().clone()
    opt.freeze(net[2])
    for x in batches(4):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
        plateau.step(1.0)  # never improves: the lr halves each time after the first
        swa_model.update_parameters(net)
        swa.step()
    assert torch.equal(net[2].weight, frozen_before)
    assert torch.equal(swa_model.module[2].weight, frozen_before)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    assert int(swa_model.n_averaged) == 4
    copy.deepcopy(opt).step()  # a copy of a scheduled, frozen optimizer still steps
