"""A loaded state with ``step`` 0 is fresh only when it is initial state: a warm restart (the step
count set back to 0, the moments kept) loads and steps as torch's class does."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch

import safeopt
from harness import assert_state_equal, bit_equal
from safeopt import _fresh

MAKERS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "Adam": (torch.optim.Adam, safeopt.Adam),
    "AdamW amsgrad": (
        lambda ps, **kw: torch.optim.AdamW(ps, amsgrad=True, **kw),
        lambda ps, **kw: safeopt.AdamW(ps, amsgrad=True, **kw),
    ),
    "wrap NAdam": (torch.optim.NAdam, lambda ps, **kw: safeopt.wrap(torch.optim.NAdam(ps, **kw))),
    "wrap RAdam": (torch.optim.RAdam, lambda ps, **kw: safeopt.wrap(torch.optim.RAdam(ps, **kw))),
}


def _restarted(make: Callable[..., Any], how: str) -> tuple[list[torch.nn.Parameter], Any]:
    """Three steps, every step count set back to 0, the state carried over by ``how``, one step."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, generator=gen)) for _ in range(2)]
    opt = make(params, lr=0.1)
    for i in range(3):
        for p in params:
            p.grad = torch.full_like(p, 0.5 + i)
        opt.step()
    for p in params:
        opt.state[p]["step"].zero_()
    if how == "pickle":
        opt = pickle.loads(pickle.dumps(opt))
        params = [p for group in opt.param_groups for p in group["params"]]
    else:
        saved = copy.deepcopy(opt.state_dict())
        params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = make(params, lr=0.1)
        opt.load_state_dict(saved)
    for p in params:
        p.grad = torch.full_like(p, 2.0)
    opt.step()
    return params, opt


# Pickled whole: safeopt's own classes (a wrapped optimizer pickles as its wrapper does).
CASES = [(name, "load_state_dict") for name in MAKERS] + [("Adam", "pickle"), ("AdamW amsgrad", "pickle")]


@pytest.mark.parametrize(("name", "how"), CASES)
def test_a_warm_restart_steps_as_torch(name: str, how: str) -> None:
    torch_make, safe_make = MAKERS[name]
    expected, torch_opt = _restarted(torch_make, how)
    actual, safe_opt = _restarted(safe_make, how)
    for e, a in zip(expected, actual):
        assert bit_equal(e, a), name
        assert_state_equal(torch_opt.state[e], safe_opt.state[a], name)


def test_initial_state_saved_still_loads_fresh() -> None:
    """What the fix must keep: an idle parameter's state (zeros, step 0) is fresh after a load, so
    its first update is torch's first step with the settings of that moment."""
    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(2)]
    opt = safeopt.Adam(params, lr=0.1)
    params[0].grad, params[1].grad = torch.ones(3), torch.zeros(3)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(saved)  # into state it had: marked fresh again
    assert type(opt.state[params[1]]) is _fresh.Fresh
    assert type(opt.state[params[0]]) is not _fresh.Fresh
    new = safeopt.Adam(params, lr=0.1)
    new.load_state_dict(saved)  # where it had none: dropped, made again when idle with a grad
    assert params[1] not in new.state
    assert type(new.state[params[0]]) is not _fresh.Fresh
