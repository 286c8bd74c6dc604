"""``python -m safeopt demo``: the ghost update, measured with torch.optim and with safeopt."""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable, Sequence

import torch
from torch import nn

import safeopt

#: A scenario trains ``model`` with ``opt_cls`` until some parameters fall idle and returns
#: them with the function that runs the idle phase.
Scenario = Callable[[type, nn.Module], tuple[list[nn.Parameter], Callable[[], None]]]


def _loss(module: nn.Module, seed: int) -> torch.Tensor:
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(seed))
    return module(x).pow(2).mean()


def _two_branch(opt_cls: type, model: nn.Module) -> tuple[list[nn.Parameter], Callable[[], None]]:
    """One Adam over two branches; both train, then only branch 1, with zero_grad(set_to_none=False)."""
    opt = opt_cls(model.parameters(), lr=1e-2)
    for step in range(5):
        opt.zero_grad(set_to_none=False)
        (_loss(model[0], step) + _loss(model[1], step)).backward()
        opt.step()

    def idle_phase() -> None:
        for step in range(50):
            opt.zero_grad(set_to_none=False)
            _loss(model[1], step).backward()  # branch 0 gets zero grads
            opt.step()

    return list(model[0].parameters()), idle_phase


def _detach_every_other_epoch(opt_cls: type, model: nn.Module) -> tuple[list[nn.Parameter], Callable[[], None]]:
    """Adam(lr=1, weight_decay=0.5); the encoder (model[0]) is detached on odd epochs."""
    opt = opt_cls(model.parameters(), lr=1.0, weight_decay=0.5)
    opt.zero_grad(set_to_none=False)
    model[1](model[0](torch.randn(32, 8))).pow(2).mean().backward()
    opt.step()

    def idle_phase() -> None:  # one odd epoch of 10 steps: the encoder sees zero grads
        for step in range(10):
            opt.zero_grad(set_to_none=False)
            x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
            model[1](model[0](x).detach()).pow(2).mean().backward()
            opt.step()

    return list(model[0].parameters()), idle_phase


def _sgd_momentum(opt_cls: type, model: nn.Module) -> tuple[list[nn.Parameter], Callable[[], None]]:
    """SGD(momentum=0.9): one real step, then zeroed grads."""
    opt = opt_cls(model.parameters(), lr=0.1, momentum=0.9)
    _loss(model, 0).backward()
    opt.step()

    def idle_phase() -> None:
        for _ in range(20):
            opt.zero_grad(set_to_none=False)
            opt.step()

    return list(model.parameters()), idle_phase


SCENARIOS: dict[str, tuple[str, Scenario, int]] = {
    "two branches, one Adam": ("Adam", _two_branch, 50),
    "detach every other epoch": ("Adam", _detach_every_other_epoch, 10),
    "SGD momentum, zeroed grads": ("SGD", _sgd_momentum, 20),
}


def _drift(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> tuple[float, float]:
    diff = torch.cat([(a.detach() - b).flatten() for a, b in zip(after, before)])
    return float(diff.norm()), float(diff.abs().max())


def demo() -> int:
    rows = []
    for name, (opt_name, scenario, steps) in SCENARIOS.items():
        drifts = []
        for opt_cls in (getattr(torch.optim, opt_name), getattr(safeopt, opt_name)):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
            idle, idle_phase = scenario(opt_cls, model)
            before = [p.detach().clone() for p in idle]
            idle_phase()
            drifts.append(_drift(before, idle))
        rows.append((name, len(idle), steps, *drifts))

    header = f"{'scenario':<28} {'idle params':>11} {'steps':>5}   {'torch.optim L2 / max':>22}   {'safeopt L2 / max':>18}"
    print(header)
    print("-" * len(header))
    for name, n, steps, (t2, tmax), (s2, smax) in rows:
        print(f"{name:<28} {n:>11} {steps:>5}   {t2:>10.3g} / {tmax:<9.3g}   {s2:>8.3g} / {smax:<7.3g}")
    print("\nDrift of the idle parameters (zero grads throughout) over the idle steps; L2 norm / max abs.")
    return 0 if all(s2 == 0 and smax == 0 for *_, (s2, smax) in rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="safeopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="show how far idle parameters drift under torch.optim and under safeopt")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo()
    return 2  # pragma: no cover - argparse rejects other commands


if __name__ == "__main__":
    sys.exit(main())
