"""state_dict: flags travel, torch and safeopt state_dicts load into each other, resume is exact."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import cases
import harness
import safeopt

SHAPES = [(3, 2), (2,), ()]


def run(opt: torch.optim.Optimizer, params: list[nn.Parameter], steps: range, freeze_at: int = 1) -> None:
    """A fixed run: grads depend only on the step number; param 1 is frozen from ``freeze_at``."""
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        kinds = ["dense", "zero" if step % 2 else "dense", "dense"]
        for p, kind in zip(params, kinds):
            p.grad = harness.make_grad(p, kind, gen)
        if step == freeze_at and hasattr(opt, "freeze"):
            opt.freeze(params[1])
        opt.step()


def fresh(case: cases.Case) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    params = harness.make_params(SHAPES, requires_grad=case.impl != "differentiable")
    return case.make_safe(params), params


@pytest.mark.parametrize("case", cases.params(where=lambda c: c.impl != "differentiable"))
def test_resume_from_checkpoint_is_bit_identical(case: cases.Case) -> None:
    whole, whole_params = fresh(case)
    run(whole, whole_params, range(4))

    first, params = fresh(case)
    run(first, params, range(2))
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # torch's default loader accepts the flags
    second, params = fresh(case)
    with torch.no_grad():
        for p, v in zip(params, saved["params"]):
            p.copy_(v)
    second.load_state_dict(saved["opt"])
    assert second.is_frozen(params[1])
    run(second, params, range(2, 4))

    for i in range(len(params)):
        assert harness.bit_equal(params[i].detach(), whole_params[i].detach()), i
        harness.assert_state_equal(second.state[params[i]], whole.state[whole_params[i]], f"param {i}")


@pytest.mark.parametrize("torch_cls", list(cases.TWINS), ids=lambda c: c.__name__)
def test_torch_and_safeopt_state_dicts_load_into_each_other(torch_cls: type) -> None:
    twin = cases.TWINS[torch_cls]
    kwargs = {"lr": 0.1, "momentum": 0.9} if twin is safeopt.SGD else {"lr": 0.1}
    params = harness.make_params(SHAPES)
    torch_opt = torch_cls(params, **kwargs)
    run(torch_opt, params, range(2))

    mine = twin(params, **kwargs)
    mine.load_state_dict(torch_opt.state_dict())
    assert not any(mine.is_frozen(p) for p in params)
    assert all(g["lazy"] is True for g in mine.param_groups)
    for p in params:
        harness.assert_state_equal(mine.state[p], torch_opt.state[p], "torch -> safeopt")

    mine.freeze(params[0])
    back = torch_cls(params, **kwargs)
    back.load_state_dict(mine.state_dict())
    for p in params:
        harness.assert_state_equal(back.state[p], mine.state[p], "safeopt -> torch")
    run(back, params, range(2, 3))  # torch ignores safeopt's keys and steps normally


def test_bad_flags_in_a_state_dict_raise_and_change_nothing() -> None:
    params = harness.make_params(SHAPES)
    opt = safeopt.Adam(params)
    opt.freeze(params[2])
    good = opt.state_dict()
    for key, value, message in [
        ("frozen_params", [5], "Invalid frozen_params in param group 0 of the state_dict: \\[5\\]"),
        ("frozen", "yes", "Invalid frozen value"),
        ("lazy", None, 'Invalid lazy value: None; expected True, False or "rows"'),
    ]:
        bad = copy.deepcopy(good)
        bad["param_groups"][0][key] = value
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(bad)
        assert opt.param_groups[0]["frozen_params"] == [2] and opt.param_groups[0]["lazy"] is True


def test_state_dict_taken_earlier_does_not_change_when_flags_do() -> None:
    params = harness.make_params(SHAPES)
    opt = safeopt.SGD(params, lr=0.1)
    sd = opt.state_dict()
    opt.freeze(params[0])
    opt.freeze(0)
    assert sd["param_groups"][0]["frozen_params"] == [] and sd["param_groups"][0]["frozen"] is False


def test_pickle_and_deepcopy_keep_flags_and_behaviour() -> None:
    params = harness.make_params(SHAPES)
    opt = safeopt.Adam(params, lr=0.1, lazy=False)
    opt.freeze(params[1])
    for other in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        assert type(other) is safeopt.Adam
        assert other.param_groups[0]["frozen_params"] == [1] and other.defaults["lazy"] is False
        held = other.param_groups[0]["params"]
        before = held[1].detach().clone()
        for p in held:
            p.grad = torch.ones_like(p)
        other.step()
        assert torch.equal(held[1], before) and not torch.equal(held[0], params[0])


def test_distributed_checkpoint_state_dict_helpers() -> None:
    """get_optimizer_state_dict materialises state by stepping once on zero grads."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    before = [p.detach().clone() for p in model.parameters()]
    opt = safeopt.Adam(model.parameters(), lr=0.1, weight_decay=0.1)
    opt.freeze(model[1])
    osd = get_optimizer_state_dict(model, opt)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)), "state init moved a parameter"
    assert all(p.grad is None for p in model.parameters())
    assert len(osd["state"]) == 4 and all(float(s["step"]) == 0 for s in osd["state"].values())
    assert osd["param_groups"][0]["frozen_params"] == [2, 3]

    other = safeopt.Adam(model.parameters(), lr=0.1, weight_decay=0.1)
    set_optimizer_state_dict(model, other, osd)
    assert other.is_frozen(model[1]) and not other.is_frozen(model[0])
