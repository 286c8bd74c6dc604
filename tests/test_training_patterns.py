"""Training patterns with an idle parameter in the optimizer: schedulers and SWA on the twins and on
wrap(), a WGAN-GP discriminator step with the generator frozen, accumulation windows.

The reference is torch stepping only the active parameters (the contract); everything is compared
with torch.equal. test_training.py covers the same patterns with every parameter active.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler, swa_utils

import safeopt


def nets() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    idle = nn.Linear(4, 1)  # in the loss with weight 0: a gradient of zeros every step
    return model, idle


def batches(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(6, 4, generator=gen) for _ in range(n)]


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "OneCycleLR": lambda opt: lr_scheduler.OneCycleLR(
        opt, max_lr=0.05, total_steps=8
    ),  # also cycles momentum
    "ReduceLROnPlateau": lambda opt: lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5),
    "ChainedScheduler": lambda opt: lr_scheduler.ChainedScheduler(
        [lr_scheduler.StepLR(opt, step_size=2, gamma=0.5), lr_scheduler.ExponentialLR(opt, gamma=0.9)]
    ),
    "SWALR": lambda opt: swa_utils.SWALR(opt, swa_lr=0.005, anneal_epochs=3),
}


def optimizer(kind: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if kind == "torch-adam":
        return torch.optim.Adam(params, lr=0.02, weight_decay=0.1)
    if kind == "twin":
        return safeopt.Adam(params, lr=0.02, weight_decay=0.1)
    if kind == "torch-rmsprop":
        return torch.optim.RMSprop(params, lr=0.02, momentum=0.9, weight_decay=0.1)
    return safeopt.wrap(torch.optim.RMSprop(params, lr=0.02, momentum=0.9, weight_decay=0.1))


@pytest.mark.parametrize("schedule", SCHEDULERS)
@pytest.mark.parametrize("make", ["twin", "wrap"])
def test_schedulers_and_swa_with_an_idle_parameter(schedule: str, make: str) -> None:
    """Learning rates (and OneCycleLR's momentum) follow torch; the active parameters, the SWA
    average and its BatchNorm statistics equal torch stepping only them; the idle one holds still."""

    def run(lazy: bool) -> tuple[nn.Module, nn.Module, swa_utils.AveragedModel, list[Any]]:
        model, idle = nets()
        if lazy:
            opt = optimizer(make, [*model.parameters(), *idle.parameters()])
        else:
            opt = optimizer("torch-adam" if make == "twin" else "torch-rmsprop", list(model.parameters()))
        sched = SCHEDULERS[schedule](opt)
        average = swa_utils.AveragedModel(model)
        seen = []
        for x in batches(8):
            opt.zero_grad(set_to_none=False)
            (model(x).pow(2).mean() + 0.0 * idle(x).sum()).backward()
            opt.step()
            sched.step(1.0) if schedule == "ReduceLROnPlateau" else sched.step()  # 1.0: never improves
            average.update_parameters(model)
            group = opt.param_groups[0]
            seen.append((group["lr"], group.get("betas"), group.get("momentum")))
        swa_utils.update_bn([x for x in batches(3)], average)
        return model, idle, average, seen

    ours, idle, our_average, our_seen = run(True)
    theirs, _, their_average, their_seen = run(False)
    assert our_seen == their_seen
    assert len({lr for lr, _, _ in our_seen}) > 1, "the schedule should change the learning rate"
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(our_average.state_dict().values(), their_average.state_dict().values()):
        assert torch.equal(a, b)
    start = nets()[1]
    assert all(torch.equal(p, q) for p, q in zip(idle.parameters(), start.parameters()))


class Critic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize(
    "impl", [{"foreach": False}, {"foreach": True}, {"fused": True}], ids=["forloop", "foreach", "fused"]
)
def test_wgan_gp_critic_step_with_the_generator_frozen(impl: dict[str, Any]) -> None:
    """One optimizer over generator and critic; the critic's loss has a gradient penalty
    (torch.autograd.grad(..., create_graph=True), then backward) and reaches the generator, whose
    grads are nonzero: frozen, it holds still; the critic equals torch.optim.Adam over the critic's
    active parameters. The critic's output bias is one of those that are not: in
    critic(fake).mean() - critic(real).mean() its gradient cancels to exactly zero every step (and
    the penalty does not depend on it), so safeopt never steps it, where torch would decay it."""

    def run(lazy: bool) -> tuple[nn.Module, nn.Module, list[bool]]:
        torch.manual_seed(0)
        gen, critic = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 4)), Critic()
        if lazy:
            opt: torch.optim.Optimizer = safeopt.Adam(
                [{"params": gen.parameters(), "name": "generator"}, {"params": critic.parameters()}],
                lr=1e-3,
                betas=(0.5, 0.9),
                weight_decay=0.01,
                **impl,
            )
            opt.freeze("generator")
        else:
            opt = torch.optim.Adam(critic.parameters(), lr=1e-3, betas=(0.5, 0.9), weight_decay=0.01, **impl)
        gen_had_grads = []
        for step, real in enumerate(batches(4)):
            gen_rng = torch.Generator().manual_seed(step)
            fake = gen(torch.randn(6, 2, generator=gen_rng))  # not detached
            eps = torch.rand(6, 1, generator=gen_rng)
            mixed = eps * real + (1 - eps) * fake
            (grad_mixed,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
            penalty = (grad_mixed.norm(dim=1) - 1).pow(2).mean()
            opt.zero_grad(set_to_none=False)
            for p in gen.parameters():  # torch's optimizer does not hold them: clear them the same way
                p.grad = None if p.grad is None else p.grad.zero_()
            (critic(fake).mean() - critic(real).mean() + 10 * penalty).backward()
            gen_had_grads.append(all(bool(p.grad.any()) for p in gen.parameters()))
            if not lazy:
                for p in critic.parameters():
                    if not p.grad.any():
                        p.grad = None  # torch over the active parameters only
            opt.step()
        return gen, critic, gen_had_grads

    gen, ours, had = run(True)
    _, theirs, _ = run(False)
    assert all(had), "the generator should receive nonzero grads from the critic's loss"
    torch.manual_seed(0)
    start_gen, start_critic = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 4)), Critic()
    assert all(torch.equal(p, q) for p, q in zip(gen.parameters(), start_gen.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), theirs.parameters()))
    assert torch.equal(ours.net[2].bias, start_critic.net[2].bias)  # the output bias: zero grads, idle
    assert not torch.equal(ours.net[2].weight, start_critic.net[2].weight)


@pytest.mark.parametrize("cls", [safeopt.AdamW, safeopt.SGD], ids=lambda c: c.__name__)
def test_accumulation_window_decides_on_the_accumulated_grad(cls: type) -> None:
    """Three micro-batches per step with zero_grad(set_to_none=False). A branch used in one
    micro-batch of a window is active for that step; a branch unused in a whole window is idle.
    The reference is torch with the idle branch's grad set to None."""
    torch_cls = torch.optim.AdamW if cls is safeopt.AdamW else torch.optim.SGD
    kwargs: dict[str, Any] = {"lr": 0.05, "weight_decay": 0.1}
    if cls is safeopt.SGD:
        kwargs["momentum"] = 0.9
    # For each step, the micro-batches in which the side branch is used.
    windows = [{0, 1, 2}, {1}, set(), set(), {2}]

    def run(lazy: bool) -> tuple[nn.Module, nn.Module, list[bool]]:
        torch.manual_seed(0)
        main, side = nn.Linear(4, 1), nn.Linear(4, 1)
        opt = (cls if lazy else torch_cls)([*main.parameters(), *side.parameters()], **kwargs)
        side_moved = []
        data = iter(batches(3 * len(windows)))
        for uses in windows:
            opt.zero_grad(set_to_none=False)
            for micro in range(3):
                x = next(data)
                out = main(x) + (side(x) if micro in uses else 0)
                (out.pow(2).mean() / 3).backward()
            if not lazy and not uses:
                for p in side.parameters():
                    p.grad = None  # what "only the active parameters" means for torch
            before = side.weight.detach().clone()
            opt.step()
            side_moved.append(not torch.equal(side.weight, before))
        return main, side, side_moved

    (main, side, moved), (ref_main, ref_side, ref_moved) = run(True), run(False)
    assert moved == [bool(uses) for uses in windows]
    assert moved == ref_moved
    assert torch.equal(main.weight, ref_main.weight) and torch.equal(main.bias, ref_main.bias)
    assert torch.equal(side.weight, ref_side.weight) and torch.equal(side.bias, ref_side.bias)
