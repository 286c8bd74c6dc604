"""safeopt.wrap(): any torch optimizer, one optimizer seen two ways."""

from __future__ import annotations

import copy
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


# -- issue 15: the seven ways wrap() broke ------------------------------------------------------


def test_strict_with_sparse_grads_restores_and_matches_sparse_adam() -> None:
    """1. strict=True with sparse grads: torch.equal takes no sparse tensor; the restore copies them."""

    def sparse_rows(rows: list[int], n: int = 5) -> torch.Tensor:
        index = torch.tensor([rows]) if rows else torch.zeros((1, 0), dtype=torch.long)
        return torch.sparse_coo_tensor(index, torch.ones(len(rows), 3), (n, 3))

    a, b = harness.make_params([(5, 3), (5, 3)])
    ref_a = nn.Parameter(a.detach().clone())
    opt = safeopt.wrap(torch.optim.SparseAdam([a, b], lr=0.1), strict=True)
    ref = torch.optim.SparseAdam([ref_a], lr=0.1)
    b_value, b_grad = b.detach().clone(), sparse_rows([])
    for step in range(3):
        a.grad, ref_a.grad = sparse_rows([0, 2]), sparse_rows([0, 2])
        b.grad = b_grad  # all-zero sparse grad: idle
        opt.step()
        ref.step()
        assert torch.equal(a, ref_a), f"step {step}"
        assert torch.equal(b, b_value) and b.grad is b_grad and b not in opt.state


def test_strict_with_quantized_state_of_an_idle_parameter() -> None:
    """2. strict=True with torchao's low-bit state (tensor subclasses without clone or equal)."""
    try:
        optim = pytest.importorskip("torchao.optim", reason="torchao is not installed (the compat extra)")
    except AttributeError as e:  # torchao 0.18 on torch 2.6: a torch API it needs is missing
        pytest.skip(f"torchao does not import on torch {torch.__version__}: {e}")
    for name in ("AdamW8bit", "AdamW4bit", "AdamWFp8"):
        params = harness.make_params([(64, 64), (64, 64)])
        ref_params = [nn.Parameter(p.detach().clone()) for p in params]
        opt = safeopt.wrap(getattr(optim, name)(params, lr=0.01), strict=True)
        ref = getattr(optim, name)(ref_params, lr=0.01)
        for p, q in zip(params, ref_params):
            p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
        opt.step()
        ref.step()
        quantized = [
            v
            for v in opt.state[params[1]].values()
            if isinstance(v, torch.Tensor) and type(v) is not torch.Tensor
        ]
        assert quantized, f"{name}: the test needs quantized state"
        saved = {
            k: [getattr(v, n).clone() for n in v.__tensor_flatten__()[0]]
            for k, v in opt.state[params[1]].items()
            if any(v is q for q in quantized)
        }
        value = params[1].detach().clone()
        params[0].grad, params[1].grad = torch.ones_like(params[0]), torch.zeros_like(params[1])
        ref_params[0].grad, ref_params[1].grad = torch.ones_like(params[0]), None
        opt.step()
        ref.step()
        assert torch.equal(params[1], value), name
        for k, inner in saved.items():
            now = opt.state[params[1]][k]
            assert all(torch.equal(getattr(now, n), t) for n, t in zip(now.__tensor_flatten__()[0], inner)), (
                name
            )
        assert torch.equal(params[0], ref_params[0]) and torch.equal(params[1], ref_params[1]), name


class NoInit(torch.optim.Optimizer):
    """An optimizer around another that never calls Optimizer.__init__ (torch-optimizer's Lookahead)."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.optimizer = inner
        self.param_groups = inner.param_groups
        self.state = {}

    def step(self, closure=None):
        return self.optimizer.step(closure)


def test_an_optimizer_that_skipped_optimizer_init_is_refused_at_wrap() -> None:
    """3. Refused at wrap(), with the fix in the message, instead of failing at every step."""
    inner = torch.optim.Adam([nn.Parameter(torch.ones(2))])
    with pytest.raises(
        ValueError,
        match=r"NoInit subclasses torch.optim.Optimizer without calling "
        r"Optimizer.__init__ .*NoInit\(safeopt.wrap\(inner\), ...\)",
    ):
        safeopt.wrap(NoInit(inner))
    # An optimizer around another that shares its groups (Lookahead) is accepted, strict:
    # tests/test_edges_versions.py.


class CountsSteppedParams(torch.optim.Optimizer):
    """Divides by the number of parameters it steps, as Ranger21 and DAdaptSGD do in effect."""

    def __init__(self, params) -> None:
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            stepped = [p for p in group["params"] if p.grad is not None]
            group["step"] = group.get("step", 0) + 1
            for p in stepped:
                p.add_(p.grad, alpha=-group["lr"] / len(stepped))  # ZeroDivisionError when none


def test_a_step_with_nothing_active_does_not_call_the_wrapped_step() -> None:
    """4. Nothing active: the wrapped step is not called (it would divide by zero here)."""
    params = harness.make_params([(2,), (3,)])
    opt = safeopt.wrap(CountsSteppedParams(params), strict=True)
    values = [p.detach().clone() for p in params]
    grads = [torch.zeros(2), torch.zeros(3)]
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    assert all(torch.equal(p, v) and p.grad is g for p, v, g in zip(params, values, grads))
    assert "step" not in opt.param_groups[0], "the group counter does not count a step nobody took"
    params[0].grad = torch.ones(2)
    opt.step()
    assert opt.param_groups[0]["step"] == 1 and not torch.equal(params[0], values[0])


@pytest.mark.parametrize(
    "module, name, kwargs",
    [("pytorch_optimizer", "Ranger21", {"num_iterations": 10}), ("dadaptation", "DAdaptSGD", {})],
)
def test_nothing_active_with_the_optimizers_that_raised(module, name, kwargs) -> None:
    cls = getattr(pytest.importorskip(module, reason=f"{module} is not installed (the compat extra)"), name)
    params = harness.make_params([(8, 8), (8,)])
    opt = safeopt.wrap(cls(params, **kwargs))
    values = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()  # the bare optimizer raises here given these zero grads as None
    assert all(torch.equal(p, v) for p, v in zip(params, values))


class ByPosition(torch.optim.Optimizer):
    """Resolves per-position overrides on its first step, as bitsandbytes does."""

    def __init__(self, params, overrides: dict[tuple[int, int], float]) -> None:
        super().__init__(params, {"lr": 0.1})
        self.overrides = overrides
        self.resolved: dict[int, float] | None = None

    @torch.no_grad()
    def step(self, closure=None):
        if self.resolved is None:
            self.resolved = {
                id(p): self.overrides.get((gi, pi), group["lr"])
                for gi, group in enumerate(self.param_groups)
                for pi, p in enumerate(group["params"])
            }
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-self.resolved[id(p)])


def test_idle_parameters_keep_their_positions_in_the_group() -> None:
    """5. Idle parameters are hidden by their grad (None for the call), not by leaving the list."""
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = safeopt.wrap(ByPosition([a, b], {(0, 1): 0.0}))  # b: lr 0
    a.grad, b.grad = torch.zeros(2), torch.ones(2)  # a idle at the first step
    params_list = opt.param_groups[0]["params"]
    opt.step()
    assert opt.param_groups[0]["params"] is params_list
    assert torch.equal(b, torch.ones(2)), "b's override stayed b's"
    a.grad = torch.ones(2)
    opt.step()
    assert torch.equal(a, torch.full((2,), 0.9)), "a kept the group lr"


def test_bitsandbytes_override_stays_with_its_parameter() -> None:
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (the compat extra)")
    a, b = nn.Parameter(torch.ones(64, 64)), nn.Parameter(torch.ones(64, 64))
    manager = bnb.optim.GlobalOptimManager.get_instance()
    manager.register_parameters([a, b])
    manager.override_config(b, "lr", 0.0)
    try:
        opt = safeopt.wrap(bnb.optim.Adam8bit([a, b], lr=0.1))
        a.grad, b.grad = torch.zeros(64, 64), torch.ones(64, 64)
        opt.step()
        assert torch.equal(b, torch.ones(64, 64)), "b's lr=0 override applied to b"
        a.grad = torch.ones(64, 64)
        opt.step()
        assert not torch.equal(a, torch.ones(64, 64)), "a kept the group lr"
    finally:
        manager.pid2config.clear()
        manager.index2config.clear()


class DecayGroup(torch.optim.Optimizer):
    """Decays every parameter of its groups, grad or not: hidden grads do not stop it."""

    def __init__(self, params) -> None:
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.mul_(0.5)
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


def test_strict_still_catches_an_optimizer_that_moves_grad_less_parameters() -> None:
    for strict in (False, True):
        a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
        a.grad, b.grad = torch.ones(2), torch.zeros(2)
        safeopt.wrap(DecayGroup([a, b]), strict=strict).step()
        assert torch.equal(b, torch.ones(2)) == strict and torch.equal(a, torch.full((2,), 0.4))


class Raises(torch.optim.Optimizer):
    def __init__(self, params) -> None:
        super().__init__(params, {})

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad = torch.full_like(p, 7.0)  # replaces grads, then fails
        raise RuntimeError("boom")


def test_grads_are_put_back_exactly_when_the_step_raises() -> None:
    a, b, c = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    grads = [torch.ones(2), torch.zeros(2), None]
    for p, g in zip((a, b, c), grads):
        p.grad = g
    opt = safeopt.wrap(Raises([a, b, c]), strict=True)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    assert all(p.grad is g for p, g in zip((a, b, c), grads))
    assert opt.param_groups[0]["params"] == [a, b, c]


class WithModes(torch.optim.SGD):
    """Public methods and attributes beyond Optimizer's, as schedule-free optimizers have."""

    mode = "eval"

    def train(self) -> None:
        self.mode = "train"

    def eval(self) -> None:
        self.mode = "eval"


def test_the_wrapped_optimizers_methods_and_attributes_are_reachable() -> None:
    """6. train()/eval() and other public names reach the wrapped optimizer; private ones do not."""
    inner = WithModes([nn.Parameter(torch.ones(2))], lr=0.1)
    opt = safeopt.wrap(inner)
    assert hasattr(opt, "train") and callable(opt.train)  # what Hugging Face's Trainer checks
    opt.train()
    assert inner.mode == "train" and opt.mode == "train"
    opt.eval()
    assert inner.mode == "eval"
    inner._secret = 1
    with pytest.raises(AttributeError, match="no attribute '_secret'"):
        opt._secret  # noqa: B018
    with pytest.raises(AttributeError):
        opt.missing  # noqa: B018


def test_schedulefree_train_and_eval_through_the_wrapper() -> None:
    schedulefree = pytest.importorskip(
        "schedulefree", reason="schedulefree is not installed (the compat extra)"
    )
    p = nn.Parameter(torch.ones(4))
    opt = safeopt.wrap(schedulefree.AdamWScheduleFree([p], lr=0.1))
    opt.train()
    for step in range(3):
        p.grad = torch.arange(4.0) * (step - 1)
        opt.step()
    trained = p.detach().clone()
    opt.eval()  # switches p to the averaged point
    assert not torch.equal(p, trained) and opt.param_groups[0]["train_mode"] is False


class SAM(torch.optim.Optimizer):
    """A SAM-style optimizer: needs the closure, calls it once inside its step."""

    def __init__(self, params, rho: float = 0.5) -> None:
        super().__init__(params, {"rho": rho})
        self.base = torch.optim.SGD(self.param_groups, lr=0.1, weight_decay=0.1)

    def step(self, closure=None):
        if closure is None:
            raise RuntimeError("SAM requires closure")
        with torch.no_grad():
            moved = []
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        e = group["rho"] * p.grad
                        p.add_(e)
                        moved.append((p, e))
                        p.grad = None
        loss = closure()
        with torch.no_grad():
            for p, e in moved:
                p.sub_(e)
        self.base.step()
        return loss


def test_a_closure_reaches_an_optimizer_that_needs_it() -> None:
    """7. The closure goes to the wrapped step; the decision is the grads' at the call."""

    def run(wrapped: bool):
        p, idle = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
        inner = SAM([p, idle])
        opt = safeopt.wrap(inner) if wrapped else inner
        calls = []

        def closure() -> torch.Tensor:
            calls.append(1)
            loss = (p * p).sum() + (
                idle * 0
            ).sum()  # idle gets a zero grad: weight decay moves it when stepped
            loss.backward()
            return loss

        closure()
        calls.clear()
        idle_grad = idle.grad
        loss = opt.step(closure)
        return p, idle, idle_grad, calls, loss

    p, idle, idle_grad, calls, loss = run(wrapped=True)
    ref_p, ref_idle, _, ref_calls, ref_loss = run(wrapped=False)
    assert calls == ref_calls == [1] and torch.equal(loss, ref_loss)
    assert torch.equal(p, ref_p), "the active parameter steps as the bare optimizer's"
    assert not torch.equal(ref_idle, torch.ones(2)), "bare SAM moves the idle parameter (weight decay)"
    assert torch.equal(idle, torch.ones(2)) and idle.grad is idle_grad


def test_a_closure_that_makes_the_grads_is_evaluated_first() -> None:
    """No grad at the call: torch's pattern; the closure runs once, before the decision."""
    p, idle = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = safeopt.wrap(WithModes([p, idle], lr=0.1))
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        loss = (p * 2).sum() + (idle * 0).sum()
        loss.backward()
        return loss

    assert float(opt.step(closure)) == 4.0 and calls == [1]
    assert not torch.equal(p, torch.ones(2)) and torch.equal(idle, torch.ones(2))


# -- issue 14: options survive copies; lazy="rows" refused at wrap(); one Lazy type ------------


def _options(opt) -> tuple:
    groups = [{k: g[k] for k in ("lazy", "frozen", "frozen_params")} for g in opt.param_groups]
    return (getattr(opt, "strict", None), opt.defaults["lazy"], groups)


def _make(kind: str, lazy, strict: bool):
    a, b, c = harness.make_params([(2, 2), (2,), (3,)])
    groups = [{"params": [a, b], "name": "ab"}, {"params": [c], "name": "c", "lazy": True}]
    if kind == "wrap":
        opt = safeopt.wrap(torch.optim.RMSprop(groups, lr=0.1), strict=strict, lazy=lazy)
    else:
        opt = getattr(safeopt, kind)(groups, lr=0.1, lazy=lazy)
    opt.freeze(b)
    opt.freeze("c")
    return opt


ROUND_TRIPS = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda opt: pickle.loads(pickle.dumps(opt)),
}
OPTIONS = [("wrap", lazy, strict) for lazy in (True, False) for strict in (False, True)] + [
    (kind, lazy, False) for kind in ("Adam", "AdamW", "SGD") for lazy in (True, False, "rows")
]


@pytest.mark.parametrize("how", sorted(ROUND_TRIPS))
@pytest.mark.parametrize("kind, lazy, strict", OPTIONS)
def test_every_option_and_freeze_flag_survives_a_copy(how, kind, lazy, strict) -> None:
    opt = _make(kind, lazy, strict)
    copied = ROUND_TRIPS[how](opt)
    assert _options(copied) == _options(opt)
    copied.add_param_group({"params": [nn.Parameter(torch.ones(2))]})
    assert copied.param_groups[-1]["lazy"] == lazy, "a group added after the copy takes the copied default"
    assert copied.is_frozen(copied.param_groups[0]["params"][1]) and copied.is_frozen("c")


@pytest.mark.parametrize("kind, lazy, strict", OPTIONS)
def test_every_flag_survives_a_state_dict_round_trip(kind, lazy, strict) -> None:
    opt = _make(kind, lazy, strict)
    fresh = _make(kind, lazy, strict)
    fresh.unfreeze("c")
    fresh.unfreeze(fresh.param_groups[0]["params"][1])
    fresh.param_groups[1]["lazy"] = lazy
    fresh.load_state_dict(harness.roundtrip(opt.state_dict()))
    assert _options(fresh) == _options(opt)


def test_lazy_rows_is_refused_by_wrap_at_once() -> None:
    w = nn.Parameter(torch.ones(2, 2))
    message = 'lazy="rows" \\(param group 0\\) is supported by safeopt.Adam'
    with pytest.raises(ValueError, match=message):
        safeopt.wrap(torch.optim.Adam([w]), lazy="rows")
    with pytest.raises(ValueError, match=message):
        safeopt.wrap(torch.optim.Adam([{"params": [w], "lazy": "rows"}]))
    opt = safeopt.wrap(torch.optim.Adam([w]))
    with pytest.raises(ValueError, match='lazy="rows"'):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2, 2))], "lazy": "rows"})
    assert len(opt.param_groups) == 1
    sd = opt.state_dict()
    sd["param_groups"][0]["lazy"] = "rows"
    with pytest.raises(ValueError, match='lazy="rows"'):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lazy"] is True


def test_returned_types_and_the_lazy_type_are_exported() -> None:
    from typing import Literal, get_args

    assert {"Finding", "ParamDrift"} <= set(safeopt.__all__)
    assert safeopt.Finding is safeopt._audit.Finding and safeopt.ParamDrift is safeopt._watch.ParamDrift
    assert set(get_args(safeopt._rule.Lazy)) == set(get_args(bool | Literal["rows"]))
