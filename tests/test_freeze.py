"""The freeze API: targets, flags, the context manager, and bad targets changing nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import safeopt


class TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)


def make(**kwargs):
    model = TwoBranch()
    opt = safeopt.Adam(
        [{"params": model.a.parameters(), "name": "a"}, {"params": model.b.parameters(), "name": "b"}],
        lr=0.1,
        **kwargs,
    )
    return model, opt


def flags(opt: torch.optim.Optimizer) -> list[tuple[bool, list[int]]]:
    return [(g["frozen"], list(g["frozen_params"])) for g in opt.param_groups]


@pytest.mark.parametrize(
    "target",
    [1, -1, "b", lambda m, o: o.param_groups[1]],
    ids=["index", "negative index", "name", "dict"],
)
def test_group_targets_freeze_the_group(target) -> None:
    model, opt = make()
    target = target(model, opt) if callable(target) else target
    opt.freeze(target)
    assert flags(opt) == [(False, []), (True, [])]
    assert opt.is_frozen(target) and opt.is_frozen(model.b) and opt.is_frozen(model.b.weight)
    assert not opt.is_frozen(model.a) and not opt.is_frozen(model)
    opt.unfreeze(target)
    assert flags(opt) == [(False, []), (False, [])]


@pytest.mark.parametrize(
    "target",
    [
        lambda m: m.b.weight,
        lambda m: m.b,
        lambda m: [m.b.weight, m.a.bias],
        lambda m: (p for p in [m.b.weight]),
    ],
    ids=["parameter", "module", "list", "generator"],
)
def test_parameter_targets_freeze_those_parameters(target) -> None:
    model, opt = make()
    opt.freeze(target(model))
    chosen = target(model)
    chosen = (
        list(chosen.parameters())
        if isinstance(chosen, nn.Module)
        else ([chosen] if isinstance(chosen, torch.Tensor) else list(target(model)))
    )
    frozen = {id(p) for p in chosen}
    for p in model.parameters():
        assert opt.is_frozen(p) == (id(p) in frozen)
    opt.unfreeze(target(model))
    assert flags(opt) == [(False, []), (False, [])]


def test_module_target_takes_only_the_parameters_the_optimizer_holds() -> None:
    model = TwoBranch()
    opt = safeopt.SGD(model.a.parameters(), lr=0.1)
    opt.freeze(model)
    assert opt.is_frozen(model.a) and opt.is_frozen(model)
    with pytest.raises(ValueError, match="none of the parameters of the module Linear"):
        opt.freeze(model.b)


def test_group_and_parameter_flags_are_independent() -> None:
    model, opt = make()
    opt.freeze(model.b.weight)
    opt.freeze("b")
    opt.unfreeze("b")
    assert opt.is_frozen(model.b.weight) and not opt.is_frozen(model.b.bias)
    opt.freeze("b")
    with pytest.raises(ValueError, match="whole group is frozen"):
        opt.unfreeze(model.b.weight)
    assert flags(opt) == [(False, []), (True, [0])]


def test_frozen_context_restores_previous_flags_even_on_error() -> None:
    model, opt = make()
    opt.freeze(model.a.weight)
    with pytest.raises(RuntimeError, match="boom"), opt.frozen(model.a):
        assert opt.is_frozen(model.a)
        opt.freeze("b")  # made inside the block: kept, the block only restores what it froze
        raise RuntimeError("boom")
    assert opt.is_frozen(model.a.weight) and not opt.is_frozen(model.a.bias)
    assert opt.is_frozen("b")
    with opt.frozen("a"):
        assert opt.is_frozen("a")
    assert not opt.param_groups[0]["frozen"]


def test_frozen_group_skips_its_parameters_in_step() -> None:
    model, opt = make(weight_decay=0.5)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = copy.deepcopy(model.b.state_dict())
    with opt.frozen("b"):
        opt.step()
    assert all(torch.equal(v, model.b.state_dict()[k]) for k, v in before.items())
    assert all(len(opt.state[p]) == 0 or int(opt.state[p]["step"]) == 0 for p in model.b.parameters())
    assert all(int(opt.state[p]["step"]) == 1 for p in model.a.parameters())


def test_add_param_group_accepts_frozen_and_lazy() -> None:
    _, opt = make()
    extra = nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [extra], "frozen": True, "lazy": False, "name": "extra"})
    assert opt.is_frozen("extra") and opt.param_groups[-1]["lazy"] is False
    extra.grad = torch.ones(2)
    opt.step()
    assert torch.equal(extra, torch.ones(2))
    other = nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [other]})
    assert opt.param_groups[-1]["frozen"] is False and opt.param_groups[-1]["lazy"] is True


@pytest.mark.parametrize(
    "target, error, message",
    [
        (2, IndexError, "param group index 2 is out of range: the optimizer has 2"),
        (-3, IndexError, "param group index -3 is out of range"),
        ("c", KeyError, "no param group is named 'c'; named groups: \\['a', 'b'\\]"),
        ({"params": []}, ValueError, "not one of this optimizer's param_groups"),
        (
            nn.Parameter(torch.zeros(7, 2)),
            ValueError,
            "tensor of shape \\(7, 2\\), dtype torch.float32 is not held",
        ),
        (nn.Linear(1, 1), ValueError, "none of the parameters of the module Linear"),
        ([], ValueError, "empty"),
        ([1.0], TypeError, "expected an iterable of parameters, found float"),
        (True, TypeError, "not a bool"),
        (1.5, TypeError, "cannot freeze a float"),
        (None, TypeError, "cannot freeze a NoneType"),
    ],
)
@pytest.mark.parametrize("method", ["freeze", "unfreeze", "is_frozen", "frozen"])
def test_bad_targets_raise_naming_them_and_change_nothing(target, error, message, method) -> None:
    model, opt = make()
    opt.freeze(model.a.weight)
    before = flags(opt)
    call = getattr(opt, method)
    with pytest.raises(error, match=message):
        result = call(target)
        if method == "frozen":
            with result:
                pass
    assert flags(opt) == before


def test_partly_held_iterable_changes_nothing() -> None:
    model, opt = make()
    stranger = nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError):
        opt.freeze([model.a.weight, stranger])
    assert not opt.is_frozen(model.a.weight)


def test_lazy_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="Invalid lazy value: 'yes'; expected True, False or \"rows\""):
        safeopt.Adam([nn.Parameter(torch.zeros(1))], lazy="yes")
    _, opt = make()
    n = len(opt.param_groups)
    with pytest.raises(ValueError, match='Invalid lazy value: 1; expected True, False or "rows"'):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "lazy": 1})
    with pytest.raises(ValueError, match="Invalid frozen value"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "frozen": "no"})
    with pytest.raises(ValueError, match="Invalid frozen_params"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "frozen_params": [3]})
    assert len(opt.param_groups) == n
