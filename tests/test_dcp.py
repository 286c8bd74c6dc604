"""torch.distributed.checkpoint save / load through get_state_dict / set_state_dict.

A fresh optimizer's state is made by ``get_state_dict`` (one step on zero grads), and ``dcp.load``
fills only the keys that state has: every key a checkpoint holds must be there, SGD's momentum
buffers included (issue 25.1), and a parameter that was idle at the save takes torch's first step
when it first updates after the resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import safeopt


def build() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.ModuleDict({"enc": nn.Linear(4, 4), "head": nn.Linear(4, 2)})
    opt = safeopt.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    return model, opt


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
        if step == 2:
            opt.freeze(model["enc"])
        opt.zero_grad(set_to_none=False)
        features = model["enc"](x)
        model["head"](features.detach() if step % 2 else features).pow(2).mean().backward()
        opt.step()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_resume_is_bit_identical_with_frozen_flags(tmp_path: Path) -> None:
    whole_model, whole_opt = build()
    train(whole_model, whole_opt, range(6))

    model, opt = build()
    train(model, opt, range(3))
    model_sd, opt_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=str(tmp_path / "ckpt"))

    model, opt = build()
    model_sd, opt_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": opt_sd}
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert opt.is_frozen(model["enc"]) and not opt.is_frozen(model["head"])
    train(model, opt, range(3, 6))

    for (name, a), b in zip(whole_model.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name
    for p, q in zip(whole_model.parameters(), model.parameters()):
        mine, theirs = opt.state.get(q, {}), whole_opt.state.get(p, {})
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), key


# --- every optimizer, with a parameter that is idle at the save and starts after the resume ----------

# name: (torch class, its arguments, whether safeopt's twin runs it; else wrap() of it)
OPTIMIZERS: dict[str, tuple[type, dict[str, Any], bool]] = {
    "Adam": (torch.optim.Adam, {"lr": 0.05, "amsgrad": True}, True),
    "AdamW": (torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.1}, True),
    "SGD-momentum": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "dampening": 0.1}, True),
    "SGD-nesterov": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}, True),
    "SGD-fused-nesterov": (
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "fused": True},
        True,
    ),
    "wrap-SGD": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "dampening": 0.1}, False),
    "wrap-RMSprop": (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.9, "centered": True}, False),
    "wrap-Adagrad": (torch.optim.Adagrad, {"lr": 0.05, "initial_accumulator_value": 0.1}, False),
    "wrap-Rprop": (torch.optim.Rprop, {"lr": 0.01}, False),
    "wrap-ASGD": (torch.optim.ASGD, {"lr": 0.05}, False),
    "wrap-NAdam": (torch.optim.NAdam, {"lr": 0.05}, False),
}
TWINS = {torch.optim.Adam: safeopt.Adam, torch.optim.AdamW: safeopt.AdamW, torch.optim.SGD: safeopt.SGD}
LATE = 4  # the step from which the late branch takes part (it has zero grads before)


def build_late(name: str) -> tuple[nn.ModuleDict, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.ModuleDict({"enc": nn.Linear(4, 4), "head": nn.Linear(4, 2), "late": nn.Linear(4, 2)})
    cls, kwargs, twin = OPTIMIZERS[name]
    params = list(model.parameters())
    return model, TWINS[cls](params, **kwargs) if twin else safeopt.wrap(cls(params, **kwargs))


def train_late(model: nn.ModuleDict, opt: torch.optim.Optimizer, steps: range) -> None:
    """enc: idle on odd steps, frozen from step 2; head: always active; late: zero grads (idle
    with a grad: fresh state) until LATE, active from then on."""
    for step in steps:
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
        if step == 2:
            opt.freeze(model["enc"])  # type: ignore[attr-defined]  # safeopt's freeze API
        if step == LATE - 1:  # a scheduler's change while late is idle: its first step must use it
            for group in opt.param_groups:
                group["lr"] = group["lr"] / 2
        opt.zero_grad(set_to_none=False)
        features = model["enc"](x)
        loss = model["head"](features.detach() if step % 2 else features).pow(2).mean()
        late = model["late"](x.detach()).pow(2).mean()
        (loss + (late if step >= LATE else late * 0)).backward()
        opt.step()


def resume(name: str, checkpoint: Path, save_at: int, steps: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    model, opt = build_late(name)
    train_late(model, opt, range(save_at))
    model_sd, opt_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=str(checkpoint))

    model, opt = build_late(name)
    model_sd, opt_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": opt_sd}
    dcp.load(state, checkpoint_id=str(checkpoint))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train_late(model, opt, range(save_at, steps))
    return model, opt


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("save_at", [1, 3, 5])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_dcp_resume_of_every_optimizer_is_bit_identical(name: str, save_at: int, tmp_path: Path) -> None:
    """Saved while enc is idle (1), frozen (3, 5), late idle with fresh state (1, 3) or started (5)."""
    steps = 7
    whole_model, whole_opt = build_late(name)
    train_late(whole_model, whole_opt, range(steps))
    model, opt = resume(name, tmp_path / "ckpt", save_at, steps)

    for (key, a), b in zip(whole_model.named_parameters(), model.parameters()):
        assert torch.equal(a, b), key
    for (key, p), q in zip(whole_model.named_parameters(), model.parameters()):
        mine, theirs = opt.state.get(q, {}), whole_opt.state.get(p, {})
        assert mine.keys() == theirs.keys(), key
        for k in mine:
            assert torch.equal(torch.as_tensor(mine[k]), torch.as_tensor(theirs[k])), (key, k)
    # Not vacuous: every branch has state worth restoring.
    assert all(whole_opt.state.get(p) for p in whole_model.parameters())
    # The late branch's first update is torch's first step with the lr of that moment: torch's
    # optimizer holding only it, made when it starts.
    start, _ = build_late(name)
    late = list(start["late"].parameters())
    cls, kwargs, _ = OPTIMIZERS[name]
    torch_opt = cls(late, **{**kwargs, "lr": kwargs["lr"] / 2})
    for step in range(LATE, steps):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
        torch_opt.zero_grad()
        start["late"](x).pow(2).mean().backward()
        torch_opt.step()
    for p, q in zip(late, model["late"].parameters()):
        assert torch.equal(p, q)
