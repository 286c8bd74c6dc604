"""The step's fixed cost, cut where it changes no result (issue 22, item 3).

- A step in which every parameter of every group is active, in one batch of torch's, runs
  torch's step on the optimizer itself: the twin (``_torch_compat.twin``) would list the same
  parameters. Steps with and without the twin, alternating, still equal torch's step on the active
  parameters, for every implementation and for the steps that need more than one batch (fused SGD
  with momentum) or copies of the grads (foreach SGD with nesterov).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import harness
import safeopt
from safeopt import _torch_compat

CASES: dict[str, tuple[type[torch.optim.Optimizer], type[torch.optim.Optimizer], dict[str, Any]]] = {
    "Adam-fused": (safeopt.Adam, torch.optim.Adam, {"lr": 0.1, "fused": True}),
    "Adam-foreach": (safeopt.Adam, torch.optim.Adam, {"lr": 0.1, "foreach": True}),
    "Adam-forloop": (safeopt.Adam, torch.optim.Adam, {"lr": 0.1, "foreach": False}),
    "AdamW-amsgrad-foreach": (
        safeopt.AdamW,
        torch.optim.AdamW,
        {"lr": 0.1, "amsgrad": True, "foreach": True},
    ),
    "SGD-momentum-fused": (safeopt.SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "fused": True}),
    "SGD-nesterov-foreach": (
        safeopt.SGD,
        torch.optim.SGD,
        {"lr": 0.1, "momentum": 0.9, "nesterov": True, "foreach": True},
    ),
}

# Per step, the kind of each of four parameters' grad: all active (no twin), then some idle or
# None (a twin), a parameter's first update after the others started (two batches for fused SGD).
PATTERNS = [
    ("dense", "dense", "dense", "none"),
    ("dense", "zero", "dense", "none"),
    ("dense", "dense", "dense", "dense"),
    ("none", "dense", "negzero", "dense"),
    ("dense", "dense", "dense", "dense"),
    ("dense", "dense", "dense", "dense"),
]


def _twins(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the twins made (``_torch_compat.twin`` calls)."""
    made: list[int] = []
    real: Callable[..., Any] = _torch_compat.twin

    def counted(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> Any:
        made.append(len(groups))
        return real(optimizer, groups)

    monkeypatch.setattr(_torch_compat, "twin", counted)
    return made


@pytest.mark.parametrize("impl", [{"fused": True}, {"foreach": True}, {"foreach": False}], ids=str)
def test_an_all_active_step_makes_no_twin(impl: dict[str, bool], monkeypatch: pytest.MonkeyPatch) -> None:
    made = _twins(monkeypatch)
    params = [nn.Parameter(torch.ones(3)) for _ in range(3)]
    opt = safeopt.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=0.1, **impl)
    for p in params:
        p.grad = torch.ones(3)
    opt.step()
    assert made == [], "a step with every parameter active made a twin"
    params[1].grad = torch.zeros(3)
    opt.step()
    assert made == [2], "a step with an idle parameter must hide it behind a twin"
    params[1].grad = None
    opt.step()
    assert made == [2, 2], "a step with a parameter without a grad must hide it behind a twin"


@pytest.mark.parametrize("name", list(CASES))
def test_steps_with_and_without_a_twin_match_torch(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    made = _twins(monkeypatch)
    cls, torch_cls, kwargs = CASES[name]
    params = harness.make_params([(3, 2), (4,), (2, 2), (5,)], seed=1)
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    opt = cls([{"params": params[:3]}, {"params": params[3:], "lr": 0.05}], **kwargs)
    ref = torch_cls([{"params": ref_params[:3]}, {"params": ref_params[3:], "lr": 0.05}], **kwargs)
    gen = torch.Generator().manual_seed(2)
    twins = []
    for step, kinds in enumerate(PATTERNS):
        grads = [harness.make_grad(p, kind, gen) for p, kind in zip(params, kinds)]
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        before = len(made)
        opt.step()
        twins.append(len(made) > before)
        active = [kind not in ("none", "zero", "negzero") for kind in kinds]
        harness.reference_step(ref, ref_params, grads, active)
        what = f"{name}, step {step} {kinds}"
        harness.assert_matches_reference(opt, params, ref, ref_params, range(len(params)), what)
        for p, g in zip(params, grads):  # grads as they were, also where torch writes into them
            assert (p.grad is None) == (g is None), what
            assert g is None or harness.bit_equal(p.grad, g), f"{what}: a grad changed"
    assert not all(twins) and any(twins), f"{name}: the steps should take both paths: {twins}"
