"""safeopt.watch: changes nothing an optimizer computes, and measures its ghost update exactly."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import safeopt

# (optimizer factory, description): torch classes in each implementation, and safeopt ones.
TORCH_OPTIMIZERS: list[tuple[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]]] = [
    ("Adam forloop", lambda p: torch.optim.Adam(p, lr=0.1, foreach=False)),
    ("Adam foreach amsgrad", lambda p: torch.optim.Adam(p, lr=0.1, foreach=True, amsgrad=True)),
    ("Adam fused", lambda p: torch.optim.Adam(p, lr=0.1, fused=True)),
    ("AdamW weight_decay", lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.5)),
    (
        "SGD momentum nesterov foreach",
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, foreach=True),
    ),
    ("SGD momentum weight_decay", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1)),
    ("RMSprop", lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5)),
    ("Adagrad", lambda p: torch.optim.Adagrad(p, lr=0.1)),
    ("NAdam", lambda p: torch.optim.NAdam(p, lr=0.1)),
]
SAFEOPT_OPTIMIZERS: list[tuple[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]]] = [
    ("safeopt.Adam", lambda p: safeopt.Adam(p, lr=0.1)),
    ("safeopt.AdamW", lambda p: safeopt.AdamW(p, lr=0.1, weight_decay=0.5, foreach=True)),
    ("safeopt.SGD", lambda p: safeopt.SGD(p, lr=0.1, momentum=0.9)),
    ("safeopt.wrap(RMSprop)", lambda p: safeopt.wrap(torch.optim.RMSprop(p, lr=0.01, momentum=0.5))),
]

# Per step, the grad of each of three parameters: "dense", "zero" (every element 0, -0.0 in one),
# or None. Parameter 0 trains throughout; 1 and 2 fall idle in different ways.
SCHEDULE = [
    ("dense", "dense", "dense"),
    ("dense", "dense", "dense"),
    ("dense", "zero", None),
    ("dense", "zero", None),
    ("dense", "zero", "dense"),
    ("dense", "dense", "zero"),
    ("dense", "zero", "zero"),
]
# What SCHEDULE gives each parameter: steps without a gradient, and of those the steps where a
# torch optimizer with momentum or decay moves it (a None grad is skipped by torch).
IDLE_STEPS = {"w0": 0, "w1": 4, "w2": 4}
MOVED_BY_TORCH = {"w0": 0, "w1": 4, "w2": 2}


def make_params(dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype)) for shape in [(4, 3), (5,), (2, 2)]]


def set_grads(params: list[nn.Parameter], kinds: tuple[str | None, ...], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p, kind in zip(params, kinds):
        if kind is None:
            p.grad = None
        elif kind == "zero":
            p.grad = torch.zeros_like(p)
            p.grad.view(-1)[0] = -0.0
        else:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


class Named(nn.Module):
    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.w0, self.w1, self.w2 = params


def assert_optimizers_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    for ga, gb in zip(a.param_groups, b.param_groups):
        for pa, pb in zip(ga["params"], gb["params"]):
            assert torch.equal(pa, pb)
            sa, sb = a.state.get(pa, {}), b.state.get(pb, {})
            assert sa.keys() == sb.keys()
            for key in sa:
                if isinstance(sa[key], torch.Tensor):
                    assert torch.equal(sa[key], sb[key]), key
                else:
                    assert sa[key] == sb[key], key


@pytest.mark.parametrize(
    "make",
    [m for _, m in TORCH_OPTIMIZERS + SAFEOPT_OPTIMIZERS],
    ids=[d for d, _ in TORCH_OPTIMIZERS + SAFEOPT_OPTIMIZERS],
)
def test_a_watched_optimizer_computes_bit_identically(make: Callable) -> None:
    plain_params, watched_params = make_params(), make_params()
    plain, watched = make(plain_params), make(watched_params)
    w = safeopt.watch(watched, Named(watched_params))
    for step, kinds in enumerate(SCHEDULE):
        set_grads(plain_params, kinds, step)
        set_grads(watched_params, kinds, step)
        plain.step()
        watched.step()
        assert_optimizers_equal(plain, watched)
        for p, q in zip(plain_params, watched_params):  # grads untouched by the watch too
            assert (p.grad is None) == (q.grad is None)
            assert p.grad is None or torch.equal(p.grad, q.grad)
    assert w.report().steps == len(SCHEDULE)


@pytest.mark.parametrize("make", [m for _, m in TORCH_OPTIMIZERS], ids=[d for d, _ in TORCH_OPTIMIZERS])
def test_the_report_counts_and_measures_torchs_ghost_update(make: Callable) -> None:
    params = make_params(torch.float64)
    opt = make(params)
    w = safeopt.watch(opt, Named(params))
    total = [torch.zeros_like(p) for p in params]  # the ghost moves, added up here independently
    for step, kinds in enumerate(SCHEDULE):
        set_grads(params, kinds, step)
        before = [p.detach().clone() for p in params]
        opt.step()
        for t, b, p, kind in zip(total, before, params, kinds):
            if kind != "dense":
                t += p.detach() - b
    report = w.report()
    rows = {row.name: row for row in report.params}
    assert set(rows) == {"w1", "w2"}  # w0 always had a gradient
    for i, name in enumerate(["w1", "w2"], start=1):
        assert rows[name].idle_steps == IDLE_STEPS[name]
        moved = MOVED_BY_TORCH[name]
        if isinstance(opt, torch.optim.Adagrad):  # no momentum, no decay: a zero grad moves nothing
            moved = 0
        assert rows[name].moved_steps == moved
        assert rows[name].shape == tuple(params[i].shape)
        assert rows[name].l2 == pytest.approx(float(total[i].norm()), rel=1e-12, abs=0)
        assert rows[name].max_abs == pytest.approx(float(total[i].abs().max()), rel=1e-12, abs=0)
    assert bool(report) == (not isinstance(opt, torch.optim.Adagrad))
    assert report.l2 == pytest.approx(float(torch.cat([t.flatten() for t in total]).norm()), rel=1e-12)
    assert len(report.history) == len(SCHEDULE)


@pytest.mark.parametrize("make", [m for _, m in SAFEOPT_OPTIMIZERS], ids=[d for d, _ in SAFEOPT_OPTIMIZERS])
def test_safeopt_optimizers_report_no_drift(make: Callable) -> None:
    params = make_params()
    opt = make(params)
    w = safeopt.watch(opt, Named(params))
    for step, kinds in enumerate(SCHEDULE):
        set_grads(params, kinds, step)
        opt.step()
    report = w.report()
    assert not report
    assert {row.name: row.idle_steps for row in report.params} == {"w1": 4, "w2": 4}
    assert all(row.moved_steps == 0 and row.l2 == 0 and row.max_abs == 0 for row in report.params)
    assert report.history == [0.0] * len(SCHEDULE)
    assert "no ghost update" in str(report)


def test_str_names_each_parameter_in_a_table() -> None:
    params = make_params()
    opt = torch.optim.Adam(params, lr=0.1)
    w = safeopt.watch(opt, Named(params))
    for step, kinds in enumerate(SCHEDULE):
        set_grads(params, kinds, step)
        opt.step()
    text = str(w.report())
    header = next(line for line in text.splitlines() if line.startswith("parameter"))
    assert header.split() == ["parameter", "shape", "idle", "steps", "moved", "drift", "L2", "max", "abs"]
    w1 = next(line for line in text.splitlines() if line.startswith("w1 "))
    assert w1.split()[:4] == ["w1", "5", "4", "4"]
    assert "2 parameter(s) had no gradient in some step, 2 of them moved there" in text
    assert w.report().table(limit=1).splitlines()[-1].startswith("... and 1 more")


def test_names_come_from_the_model_then_the_optimizer_then_positions() -> None:
    params = make_params()
    for p in params:
        p.grad = torch.zeros_like(p)
    named = torch.optim.Adam([("first", params[0]), ("second", params[1])], lr=0.1)
    model = nn.Module()
    model.second_in_model = params[1]
    w = safeopt.watch(named, model)
    named.step()
    assert {row.name for row in w.report().params} == {"first", "second_in_model"}

    positional = torch.optim.Adam([params[0]], lr=0.1)
    positional.add_param_group({"params": [params[2]]})
    w = safeopt.watch(positional)
    positional.step()
    assert {row.name for row in w.report().params} == {"param_groups[0][0]", "param_groups[1][0]"}

    plain = torch.optim.Adam(params, lr=0.1)
    shared = Named(params)
    shared.tied = params[1]  # a second name for w1: the first one is used
    w = safeopt.watch(plain, shared)
    plain.step()
    assert {row.name for row in w.report().params} == {"w0", "w1", "w2"}


def test_a_closure_is_judged_by_the_grads_it_makes() -> None:
    params = make_params()
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    w = safeopt.watch(opt, Named(params))
    set_grads(params, ("dense", "dense", "dense"), 0)
    opt.step()

    def closure() -> torch.Tensor:
        set_grads(params, ("dense", "zero", "dense"), 1)  # before step() every grad was dense
        return torch.tensor(0.0)

    opt.step(closure)
    rows = {row.name: row for row in w.report().params}
    assert set(rows) == {"w1"} and rows["w1"].moved_steps == 1


def test_remove_and_the_context_manager_take_the_hooks_off() -> None:
    params = make_params()
    opt = torch.optim.Adam(params, lr=0.1)
    hooks = (dict(opt._optimizer_step_pre_hooks), dict(opt._optimizer_step_post_hooks))
    with safeopt.watch(opt) as w:
        set_grads(params, ("dense", "zero", "zero"), 0)
        opt.step()
        opt.step()
    assert (dict(opt._optimizer_step_pre_hooks), dict(opt._optimizer_step_post_hooks)) == hooks
    opt.step()
    assert w.report().steps == 2
    assert w.optimizer is opt
    w.remove()  # a second time is harmless


def test_a_parameter_that_stays_nan_did_not_move() -> None:
    p = nn.Parameter(torch.tensor([float("nan"), 1.0]))
    opt = torch.optim.SGD([p], lr=0.1)
    w = safeopt.watch(opt)
    p.grad = torch.zeros(2)
    opt.step()
    assert w.report().params[0].moved_steps == 0


def test_watch_rejects_what_is_not_an_optimizer() -> None:
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        safeopt.watch([nn.Parameter(torch.ones(1))])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="nn.Module"):
        safeopt.watch(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1), model="model")  # type: ignore[arg-type]


def test_watch_sees_a_real_model_train_with_gradscaler_and_a_scheduler() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    reference = copy.deepcopy(model)
    opts = [torch.optim.AdamW(m.parameters(), lr=0.1) for m in (model, reference)]
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2) for o in opts]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GradScaler is disabled on the CPU and says so
        scalers = [torch.amp.GradScaler("cpu", enabled=False) for _ in opts]
    w = safeopt.watch(opts[0], model)
    for step in range(6):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
        for m, o, s, sc in zip((model, reference), opts, scheds, scalers):
            o.zero_grad(set_to_none=False)
            hidden = m[0](x)
            if step >= 2:
                hidden = hidden.detach()
            sc.scale(m[1](hidden).pow(2).mean()).backward()
            sc.step(o)
            sc.update()
            s.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    rows = {row.name: row for row in w.report().params}
    assert set(rows) == {"0.weight", "0.bias"}
    assert all(row.idle_steps == 4 and row.moved_steps == 4 for row in rows.values())
