"""AMP (autocast + GradScaler) and torch.compile with safeopt optimizers, against torch, with torch.equal.

GradScaler skips a step whose grads hold inf or NaN and otherwise steps the optimizer it is given:
safeopt must skip the same steps, keep the lazy rule in the others, and match torch bit for bit.
torch.compile: the lazy decision reads grads on the host, so dynamo breaks the graph there and
runs torch's step in graphs of its own; the results must equal torch's compiled step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import safeopt

IMPLS = {
    "forloop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    # The device decision: GradScaler's found_inf combined with each parameter's own.
    "fused_capturable": {"fused": True, "capturable": True},
}


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def batch(step: int) -> torch.Tensor:
    return torch.randn(8, 6, generator=torch.Generator().manual_seed(step))


def snapshot(params: list[nn.Parameter], opt: torch.optim.Optimizer) -> list[Any]:
    out: list[Any] = []
    for p in params:
        out.append(p.detach().clone())
        out.append({k: v.clone() for k, v in opt.state.get(p, {}).items()})
    return out


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


# --- AMP ------------------------------------------------------------------------------------------

POISON = {3: float("inf"), 6: float("nan")}  # steps whose grads get an inf or a NaN


def amp_run(make_opt: Callable[[list[nn.Parameter]], torch.optim.Optimizer], steps: int = 8) -> list[Any]:
    """Train with autocast(bfloat16) and GradScaler; return snapshots (params, state, scale) per step."""
    model = net()
    params = list(model.parameters())
    opt = make_opt(params)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    history = []
    for step in range(steps):
        opt.zero_grad(set_to_none=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(batch(step)).float().pow(2).mean()
        scaler.scale(loss).backward()
        if step in POISON:
            model[0].weight.grad[0, 0] = POISON[step]
        scaler.step(opt)
        scaler.update()
        history.append([*snapshot(params, opt), scaler.get_scale()])
    return history


@pytest.mark.parametrize("impl", IMPLS, ids=list(IMPLS))
@pytest.mark.parametrize("make", ["twin", "wrap"])
def test_autocast_and_grad_scaler_match_torch_and_skip_inf_nan_steps(impl: str, make: str) -> None:
    kwargs = {"lr": 0.01, "weight_decay": 0.01, **IMPLS[impl]}

    def ours(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if make == "twin":
            return safeopt.AdamW(params, **kwargs)
        return safeopt.wrap(torch.optim.AdamW(params, **kwargs))

    mine, theirs = amp_run(ours), amp_run(lambda params: torch.optim.AdamW(params, **kwargs))
    for step, (a, b) in enumerate(zip(mine, theirs)):
        assert same(a, b), f"step {step}: safeopt differs from torch"
    for step in POISON:  # the poisoned steps were skipped (and not vacuously: the others moved)
        assert same(mine[step][:-1], mine[step - 1][:-1]), f"step {step} was not skipped"
        assert mine[step][-1] < mine[step - 1][-1], "the scale did not back off"
        assert not torch.equal(mine[step + 1][0], mine[step][0])


@pytest.mark.parametrize("impl", IMPLS, ids=list(IMPLS))
@pytest.mark.parametrize("make", ["twin", "wrap"])
def test_grad_scaler_keeps_the_lazy_rule(impl: str, make: str) -> None:
    """An idle branch (all-zero grads) and a frozen one (nonzero grads) stay bit-identical, state
    included, through scaled, grown, backed-off and skipped steps; the used branch equals torch
    stepping only it."""

    def run(lazy: bool) -> tuple[list[Any], list[Any], list[Any]]:
        torch.manual_seed(0)
        used, idle, frozen = nn.Linear(6, 3), nn.Linear(6, 3), nn.Linear(6, 3)
        kwargs = {"lr": 0.01, "weight_decay": 0.1, **IMPLS[impl]}
        if not lazy:
            opt: torch.optim.Optimizer = torch.optim.Adam(used.parameters(), **kwargs)
        else:
            every = [*used.parameters(), *idle.parameters(), *frozen.parameters()]
            opt = (
                safeopt.Adam(every, **kwargs)
                if make == "twin"
                else safeopt.wrap(torch.optim.Adam(every, **kwargs))
            )
            opt.freeze(frozen)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        history = []
        for step in range(7):
            opt.zero_grad(set_to_none=False)
            x = batch(step)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = (used(x) + frozen(x) + 0.0 * idle(x)).float().pow(2).mean()
            scaler.scale(loss).backward()
            if step in POISON:
                used.weight.grad[0, 0] = POISON[step]
            scaler.step(opt)
            scaler.update()
            history.append([*snapshot(list(used.parameters()), opt), scaler.get_scale()])
        rest = [*snapshot(list(idle.parameters()), opt), *snapshot(list(frozen.parameters()), opt)]
        start = [p.detach().clone() for p in (*idle.parameters(), *frozen.parameters())]
        return history, rest, start

    (mine, rest, start), (theirs, _, _) = run(True), run(False)
    assert same(mine, theirs)
    values, states = rest[0::2], rest[1::2]
    assert same(values, start), "an idle or frozen parameter moved"
    assert all(not s or int(s["step"]) == 0 for s in states), (
        "an idle or frozen parameter's step count advanced"
    )
    assert all(not s or all(not v.any() for k, v in s.items() if k != "step") for s in states)


# --- torch.compile --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def train(
    opt_cls: type,
    impl: dict[str, Any],
    *,
    compile_step: str | None,
    compile_model: str | None = None,
    steps: int = 4,
) -> list[Any]:
    """Two branches used alternately with zero_grad(set_to_none=False); snapshots after each step."""
    model = net()
    side = nn.Linear(6, 3)
    params = [*model.parameters(), *side.parameters()]
    opt = opt_cls(params, lr=0.05, weight_decay=0.1, **impl)
    forward = torch.compile(model, backend=compile_model) if compile_model else model
    side_forward = torch.compile(side, backend=compile_model) if compile_model else side

    def step(x: torch.Tensor, use_side: bool) -> torch.Tensor:
        loss = (side_forward(x) if use_side else forward(x)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss

    run = torch.compile(step, backend=compile_step) if compile_step else step
    history = []
    for i in range(steps):
        run(batch(i), use_side=i % 2 == 1)
        history.append(snapshot(params, opt))
    return history


@pytest.mark.parametrize("impl", IMPLS, ids=list(IMPLS))
def test_compiled_model_with_eager_step_is_bit_identical_to_eager(impl: str) -> None:
    """torch.compile(model) (aot_eager), opt.step() outside: identical to eager, idle branch included."""
    eager = train(safeopt.Adam, IMPLS[impl], compile_step=None)
    compiled = train(safeopt.Adam, IMPLS[impl], compile_step=None, compile_model="aot_eager")
    assert same(compiled, eager)
    # Snapshots interleave value and state: [0:8] the model's four parameters, [8:12] the side branch.
    assert not torch.equal(eager[1][8], eager[0][8])  # the side branch trains in step 1
    assert same(eager[2][8:], eager[1][8:])  # and holds still in step 2, state included
    assert not torch.equal(eager[2][0], eager[1][0])  # while the model trains


@pytest.mark.parametrize(
    ("backend", "impl"),
    [("aot_eager", "foreach"), ("aot_eager", "fused"), ("inductor", "forloop")],
    ids=["aot_eager-foreach", "aot_eager-fused", "inductor-forloop"],
)
def test_compiled_training_step_equals_torchs_compiled_step(backend: str, impl: str) -> None:
    """torch.compile over forward, backward, opt.step() and zero_grad. With every parameter active,
    safeopt's compiled step equals torch.optim's compiled step bit for bit; with branches used in
    turn, the idle one stays bit-identical under compile as in eager."""
    torch_cls = torch.optim.Adam

    def all_active(opt_cls: type) -> list[Any]:
        model = net()
        opt = opt_cls(model.parameters(), lr=0.05, weight_decay=0.1, **IMPLS[impl])

        def step(x: torch.Tensor) -> None:
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=False)

        run = torch.compile(step, backend=backend)
        out = []
        for i in range(3):
            run(batch(i))
            out.append(snapshot(list(model.parameters()), opt))
        return out

    mine = all_active(safeopt.Adam)
    torch._dynamo.reset()
    assert same(mine, all_active(torch_cls))

    torch._dynamo.reset()
    compiled = train(safeopt.Adam, IMPLS[impl], compile_step=backend)
    for i in range(1, len(compiled)):
        idle = slice(8, 12) if i % 2 == 0 else slice(0, 8)  # the branch not used in step i
        assert same(compiled[i][idle], compiled[i - 1][idle]), f"the idle branch moved in step {i}"
        assert not same(compiled[i], compiled[i - 1])


def test_compiled_fused_step_is_bit_identical_to_eager() -> None:
    """With the fused kernel (one op, which dynamo does not decompose) and aot_eager, the whole
    compiled step, idle branch included, is bit-identical to eager."""
    eager = train(safeopt.Adam, IMPLS["fused"], compile_step=None)
    torch._dynamo.reset()  # trace afresh, so that dynamo's warnings about safeopt's code come again
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = train(safeopt.Adam, IMPLS["fused"], compile_step="aot_eager")
    assert same(compiled, eager)
    # Tracing safeopt's step warns about nothing in safeopt (it once met an lru_cache wrapper).
    assert not [str(w.message) for w in caught if "safeopt" in str(w.message)]
