"""torch.distributed.checkpoint save / load through get_state_dict / set_state_dict."""

from __future__ import annotations

from pathlib import Path

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
