"""The scenarios of the demo: small models trained the way people do, where parameters go without
a gradient in some steps (one branch at a time, detached features, an auxiliary head, a GAN, a
mixture of experts).

Each scenario runs once with a ``torch.optim`` optimizer and once with its safeopt twin under
:func:`safeopt.watch`, which records how far every parameter moved in the steps where it had no
gradient. ``python -m safeopt demo`` prints and plots the result (``safeopt/_demo.py``); the
tests (``tests/test_demo.py``) check that torch drifts and safeopt does not in every one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

import safeopt
from safeopt._watch import WatchReport

__all__ = ["SCENARIOS", "Result", "Scenario", "run", "run_all"]

#: A scenario builds its model and optimizer from an optimizer class and returns them with the
#: function that runs training step ``i`` (zero_grad, backward, step).
Build = Callable[[type], tuple[nn.Module, torch.optim.Optimizer, Callable[[int], None]]]


class Scenario(NamedTuple):
    name: str
    optimizer: str  # the class name, in torch.optim and in safeopt
    steps: int
    idle: str  # which parameters go without a gradient, and when
    build: Build


def _mlp(d_in: int = 8, d_out: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, 16), nn.Tanh(), nn.Linear(16, d_out))


def _batch(step: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(step))


def _two_branches(opt_cls: type) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[int], None]]:
    model = nn.ModuleDict({"a": _mlp(), "b": _mlp()})
    opt = opt_cls(model.parameters(), lr=1e-2)

    def step(i: int) -> None:
        branch = model["a"] if (i // 10) % 2 == 0 else model["b"]  # 10 steps each, in turn
        opt.zero_grad(set_to_none=False)
        branch(_batch(i, 32, 8)).pow(2).mean().backward()
        opt.step()

    return model, opt, step


def _detach_every_other_epoch(
    opt_cls: type,
) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[int], None]]:
    model = nn.ModuleDict({"encoder": _mlp(), "head": _mlp()})
    opt = opt_cls(model.parameters(), lr=1e-2, weight_decay=0.1)

    def step(i: int) -> None:
        features = model["encoder"](_batch(i, 32, 8))
        if (i // 10) % 2 == 1:  # odd epochs of 10 steps train the head alone
            features = features.detach()
        opt.zero_grad(set_to_none=False)
        model["head"](features).pow(2).mean().backward()
        opt.step()

    return model, opt, step


def _sgd_momentum(opt_cls: type) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[int], None]]:
    model = nn.ModuleDict({"body": _mlp(), "aux_head": nn.Linear(8, 1)})
    opt = opt_cls(model.parameters(), lr=0.05, momentum=0.9)

    def step(i: int) -> None:
        features = model["body"](_batch(i, 32, 8))
        loss = features.pow(2).mean()
        if i % 5 == 0:  # the auxiliary loss is computed on every 5th batch only
            loss = loss + (model["aux_head"](features) - 1).pow(2).mean()
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()

    return model, opt, step


def _gan(opt_cls: type) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[int], None]]:
    model = nn.ModuleDict({"generator": _mlp(4, 8), "discriminator": _mlp(8, 1)})
    gen, disc = model["generator"], model["discriminator"]
    opt = opt_cls(model.parameters(), lr=1e-3, betas=(0.5, 0.999))
    ones, zeros = torch.ones(32, 1), torch.zeros(32, 1)

    def step(i: int) -> None:
        z = _batch(i, 32, 4)
        opt.zero_grad(set_to_none=False)
        if i % 2 == 0:  # discriminator step: the generator's grads stay zero
            real = _batch(10_000 + i, 32, 8) + 2
            loss = F.binary_cross_entropy_with_logits(disc(real), ones)
            loss = loss + F.binary_cross_entropy_with_logits(disc(gen(z).detach()), zeros)
            loss.backward()
        else:  # generator step: the discriminator is switched off, its grads stay zero
            disc.requires_grad_(False)
            F.binary_cross_entropy_with_logits(disc(gen(z)), ones).backward()
            disc.requires_grad_(True)
        opt.step()

    return model, opt, step


class _MoE(nn.Module):
    """Hash routing: a token of domain ``d`` goes to expert ``d % n_experts``."""

    def __init__(self, n_experts: int = 4, dim: int = 8) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_experts))

    def forward(self, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            idx = (domain % len(self.experts) == e).nonzero().flatten()
            out = out.index_add(0, idx, expert(x[idx]))  # no tokens: a zero grad, not None
        return out


def _moe(opt_cls: type) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[int], None]]:
    model = _MoE()
    opt = opt_cls(model.parameters(), lr=1e-2)

    def step(i: int) -> None:
        domains = 4 if i < 10 else 2  # after 10 steps the data holds two domains: experts 2, 3 idle
        domain = torch.randint(domains, (64,), generator=torch.Generator().manual_seed(i))
        opt.zero_grad()  # set_to_none=True does not help: idle experts still get zero grads
        model(_batch(i, 64, 8), domain).pow(2).mean().backward()
        opt.step()

    return model, opt, step


SCENARIOS = [
    Scenario(
        "two branches, one at a time",
        "Adam",
        60,
        "the branch not trained, every other 10 steps",
        _two_branches,
    ),
    Scenario(
        "detach every other epoch",
        "AdamW",
        60,
        "the encoder in odd epochs (weight_decay=0.1)",
        _detach_every_other_epoch,
    ),
    Scenario(
        "SGD momentum, zeroed grads", "SGD", 60, "an auxiliary head used on every 5th batch", _sgd_momentum
    ),
    Scenario("GAN, one optimizer", "Adam", 60, "generator and discriminator in turn", _gan),
    Scenario("mixture of experts", "Adam", 60, "experts 2 and 3 once their domains leave the data", _moe),
]


class Result(NamedTuple):
    scenario: Scenario
    n_params: int  # parameter tensors in the model
    torch_report: WatchReport
    safeopt_report: WatchReport


def run(scenario: Scenario, opt_cls: type) -> tuple[int, WatchReport]:
    """Train ``scenario`` with ``opt_cls`` under :func:`safeopt.watch`; seeded, so both runs match."""
    torch.manual_seed(0)
    model, opt, step = scenario.build(opt_cls)
    with safeopt.watch(opt, model) as watched:
        for i in range(scenario.steps):
            step(i)
    return len(list(model.parameters())), watched.report()


def run_all(scenarios: Sequence[Scenario] = SCENARIOS) -> list[Result]:
    results = []
    for s in scenarios:
        n, torch_report = run(s, getattr(torch.optim, s.optimizer))
        _, safeopt_report = run(s, getattr(safeopt, s.optimizer))
        results.append(Result(s, n, torch_report, safeopt_report))
    return results
