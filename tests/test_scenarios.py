"""The situations users hit: torch.optim moves parameters that got no gradient; safeopt does not."""

from __future__ import annotations

import copy

import torch
from torch import nn

import safeopt


class TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.right = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        return getattr(self, branch)(x)


def snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(module: nn.Module, values: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, v) for p, v in zip(module.parameters(), values))


def alternate(opt_cls: type, model: TwoBranch, steps: int = 6) -> dict[str, list[bool]]:
    """Train one branch at a time with one optimizer; report, per step, whether the idle branch stayed."""
    opt = opt_cls(model.parameters(), lr=1e-2)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    stayed: dict[str, list[bool]] = {"left": [], "right": []}
    for step in range(steps):
        active, idle = ("left", "right") if step % 2 == 0 else ("right", "left")
        opt.zero_grad(set_to_none=False)
        model(x, active).pow(2).mean().backward()
        before = snapshot(getattr(model, idle))
        opt.step()
        stayed[idle].append(same(getattr(model, idle), before))
    return stayed


def test_two_branches_one_adam_zero_grad_set_to_none_false() -> None:
    torch.manual_seed(0)
    model = TwoBranch()
    twin = copy.deepcopy(model)
    ghost = alternate(torch.optim.Adam, model)
    safe = alternate(safeopt.Adam, twin)
    assert not all(ghost["left"] + ghost["right"]), "torch.optim.Adam should move the idle branch"
    assert all(safe["left"] + safe["right"])
    # The first step is identical: only the left branch has ever had a gradient.


def test_detach_every_other_epoch_with_weight_decay() -> None:
    """A head trained on detached features every other epoch: the encoder's grads are zero then."""
    torch.manual_seed(0)
    encoder, head = nn.Linear(4, 4), nn.Linear(4, 1)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))

    def train(opt_cls: type) -> list[bool]:
        enc, hd = copy.deepcopy(encoder), copy.deepcopy(head)
        opt = opt_cls([*enc.parameters(), *hd.parameters()], lr=1.0, weight_decay=0.5)
        stayed = []
        for epoch in range(4):
            opt.zero_grad(set_to_none=False)
            features = enc(x)
            if epoch % 2:
                features = features.detach()
            hd(features).pow(2).mean().backward()
            before = snapshot(enc)
            opt.step()
            if epoch % 2:
                stayed.append(same(enc, before))
        return stayed

    assert train(torch.optim.Adam) == [False, False], "weight decay and momentum move the detached encoder"
    assert train(safeopt.Adam) == [True, True]


def test_sgd_momentum_after_zeroed_grads() -> None:
    def coast(opt_cls: type) -> tuple[list[bool], torch.Tensor]:
        p = nn.Parameter(torch.ones(3))
        opt = opt_cls([p], lr=0.1, momentum=0.9)
        p.grad = torch.ones(3)
        opt.step()
        stayed = []
        for _ in range(3):
            opt.zero_grad(set_to_none=False)
            before = p.detach().clone()
            opt.step()
            stayed.append(torch.equal(p, before))
        return stayed, opt.state[p]["momentum_buffer"].clone()

    torch_stayed, torch_buffer = coast(torch.optim.SGD)
    safe_stayed, safe_buffer = coast(safeopt.SGD)
    assert torch_stayed == [False, False, False], "torch keeps coasting on the momentum buffer"
    assert safe_stayed == [True, True, True]
    assert torch.equal(safe_buffer, torch.ones(3)) and not torch.equal(torch_buffer, torch.ones(3))


def test_frozen_branch_with_dense_grads_stays_put() -> None:
    """Freezing beats gradients: a frozen discriminator is not touched even if its grads are nonzero."""
    torch.manual_seed(0)
    model = TwoBranch()
    opt = safeopt.AdamW(model.parameters(), lr=0.1)
    x = torch.randn(4, 4)
    (model(x, "left") + model(x, "right")).sum().backward()
    before = snapshot(model.right)
    with opt.frozen(model.right):
        opt.step()
    assert same(model.right, before)
    assert all(len(opt.state[p]) == 0 or int(opt.state[p]["step"]) == 0 for p in model.right.parameters())
    opt.step()
    assert not same(model.right, before)
