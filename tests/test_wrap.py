"""safeopt.wrap(): any torch optimizer, one optimizer seen two ways."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import harness
import safeopt


class DecayEverything(torch.optim.Optimizer):
    """A third-party style optimizer that decays every parameter it saw at construction,
    grad or not, and keeps its own list of them: the case ``strict=True`` is for."""

    def __init__(self, params, lr: float = 0.1, decay: float = 0.5) -> None:
        super().__init__(params, {"lr": lr, "decay": decay})
        self.everything = [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        for p in self.everything:
            p.mul_(1 - self.defaults["decay"])
            state = self.state[p]
            state["seen"] = state.get("seen", 0) + 1
            if p.grad is not None:
                p.add_(p.grad, alpha=-self.defaults["lr"])
                p.grad.mul_(2)  # rude: changes the caller's grad


def test_wrapper_is_an_optimizer_sharing_groups_and_state() -> None:
    params = harness.make_params([(2, 2), (3,)])
    inner = torch.optim.RMSprop(params, lr=0.1)
    opt = safeopt.wrap(inner)
    assert isinstance(opt, torch.optim.Optimizer) and opt.optimizer is inner
    assert (
        opt.param_groups is inner.param_groups and opt.state is inner.state and opt.defaults is inner.defaults
    )
    extra = nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [extra], "name": "extra", "frozen": True})
    assert inner.param_groups[-1]["params"] == [extra] and opt.is_frozen("extra")
    assert "safeopt.wrap(RMSprop" in repr(opt)


def test_lr_schedulers_drive_the_wrapped_optimizer() -> None:
    params = harness.make_params([(2,)])
    inner = torch.optim.Adagrad(params, lr=1.0)
    opt = safeopt.wrap(inner)
    step_lr = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.1)
    for _ in range(2):
        params[0].grad = torch.ones(2)
        opt.step()
        step_lr.step()
    plateau.step(1.0)
    plateau.step(1.0)
    assert inner.param_groups[0]["lr"] == pytest.approx(0.025)


def test_hooks_run_once_whoever_registered_them() -> None:
    params = harness.make_params([(2,)])
    inner = torch.optim.NAdam(params)
    calls: list[str] = []
    inner.register_step_pre_hook(lambda o, *_: calls.append(f"inner-pre:{type(o).__name__}"))
    opt = safeopt.wrap(inner)
    opt.register_step_post_hook(lambda o, *_: calls.append("wrapper-post"))
    handle = register_optimizer_step_pre_hook(lambda *_: calls.append("global"))
    try:
        params[0].grad = torch.ones(2)
        opt.step()
    finally:
        handle.remove()
    assert calls == ["global", "inner-pre:LazyWrapper", "wrapper-post"]


def test_closure_runs_once_before_the_decision() -> None:
    p = nn.Parameter(torch.ones(2))
    q = nn.Parameter(torch.ones(2))
    opt = safeopt.wrap(torch.optim.Adamax([p, q], lr=0.1))
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        opt.zero_grad(set_to_none=False)
        loss = (p * 3).sum() + q.sum() * 0
        loss.backward()
        return loss

    q.grad = torch.ones(2)  # stale: the closure zeroes it, so q must not move
    loss = opt.step(closure)
    assert calls == [1] and float(loss.detach()) == 6.0
    assert not torch.equal(p, torch.ones(2)) and torch.equal(q, torch.ones(2))


@pytest.mark.parametrize(
    "target, error, message",
    [
        (torch.optim.LBFGS([nn.Parameter(torch.ones(1))]), ValueError, "LBFGS re-evaluates its closure"),
        (safeopt.Adam([nn.Parameter(torch.ones(1))]), ValueError, "Adam already follows the lazy rule"),
        (object(), TypeError, "wrap\\(\\) takes a torch.optim.Optimizer, got object"),
    ],
)
def test_wrap_refuses_what_it_cannot_serve(target, error, message) -> None:
    with pytest.raises(error, match=message):
        safeopt.wrap(target)


def test_wrapping_twice_is_refused() -> None:
    opt = safeopt.wrap(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1))
    with pytest.raises(ValueError, match="LazyWrapper already follows the lazy rule"):
        safeopt.wrap(opt)


def test_strict_restores_what_an_unusual_optimizer_touches() -> None:
    def setup(strict: bool):
        a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
        ga, gb = torch.ones(2), torch.zeros(2)
        a.grad, b.grad = ga, gb
        return safeopt.wrap(DecayEverything([a, b]), strict=strict), a, b, ga, gb

    loose, a, b, _, _ = setup(strict=False)
    loose.step()
    assert not torch.equal(b, torch.ones(2)), "the optimizer reaches b anyway: strict is needed"

    strict, a, b, _, gb = setup(strict=True)
    assert strict.strict
    strict.step()
    assert torch.equal(b, torch.ones(2)) and b.grad is gb and torch.equal(gb, torch.zeros(2))
    assert b not in strict.state, "state the step created for an inactive parameter is removed"
    assert torch.equal(a, torch.full((2,), 0.4)) and int(strict.state[a]["seen"]) == 1
    b.grad = torch.ones(2)
    strict.step()
    assert int(strict.state[b]["seen"]) == 1 and int(strict.state[a]["seen"]) == 2


def test_strict_keeps_inactive_parameters_version_counters() -> None:
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    a.grad, b.grad = torch.ones(2), torch.zeros(2)
    opt = safeopt.wrap(torch.optim.Adam([a, b]), strict=True)
    version = b._version
    opt.step()
    assert b._version == version


def test_state_dict_and_pickle_go_through_the_wrapped_optimizer() -> None:
    params = harness.make_params([(2,), (3,)])
    opt = safeopt.wrap(torch.optim.RAdam(params, lr=0.1), strict=True)
    opt.freeze(params[1])
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    assert sd == opt.optimizer.state_dict() and sd["param_groups"][0]["frozen_params"] == [1]

    other = safeopt.wrap(torch.optim.RAdam(params, lr=0.1))
    other.load_state_dict(sd)
    assert other.is_frozen(params[1]) and int(other.state[params[0]]["step"]) == 1
    # params[1] was idle with a grad: its fresh state (step 0) is not restored, as torch, having
    # stepped only active parameters, would allocate it at the first update.
    assert float(sd["state"][1]["step"]) == 0 and params[1] not in other.state

    copy = pickle.loads(pickle.dumps(opt))
    assert isinstance(copy, safeopt.wrap(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1)).__class__)
    assert copy.strict and copy.param_groups[0]["frozen_params"] == [1]


def test_grad_scaler_attributes_reach_the_wrapped_optimizer() -> None:
    inner = torch.optim.Adam([nn.Parameter(torch.ones(1))], fused=True)
    opt = safeopt.wrap(inner)
    assert opt._step_supports_amp_scaling is True
    opt.grad_scale = torch.tensor(2.0)
    assert inner.grad_scale is opt.grad_scale
    del opt.grad_scale
    assert not hasattr(inner, "grad_scale") and getattr(opt, "grad_scale", None) is None


def test_zero_grad_is_the_wrapped_optimizers() -> None:
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    opt = safeopt.wrap(torch.optim.SGD([p], lr=0.1))
    opt.zero_grad(set_to_none=False)
    assert torch.equal(p.grad, torch.zeros(2))
    opt.zero_grad()
    assert p.grad is None
