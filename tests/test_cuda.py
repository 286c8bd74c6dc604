"""CUDA-only properties. Skipped, with the reason, where no CUDA device is present.

The property machines of ``tests/test_properties.py`` run on CUDA too (``test_cuda_machine``);
here: host synchronisations, CUDA-graph capture and replay, GradScaler, half-precision params.
``benchmarks/gpu_check.py`` runs this file and the GPU benchmark on a lent GPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

import harness
import safeopt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

IMPLS = {"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
SHAPES = [(64, 32), (32,), (16, 16), (8,), (128,), (4, 4, 4)]


@contextmanager
def syncs() -> Iterator[list[str]]:
    """The host synchronisations inside the block, as torch's sync debug mode reports them."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    seen: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    seen.extend(str(w.message) for w in caught if "synchroniz" in str(w.message))


@pytest.mark.parametrize("impl", IMPLS)
def test_the_eager_decision_costs_one_or_two_host_synchronisations(impl: str) -> None:
    """One when the first-element probe settles every grad; two when some grads are zero (the probe
    round, then the full reduction of the grads it could not settle); never one per grad."""
    params = harness.make_params(SHAPES, device="cuda")
    opt = safeopt.Adam(params, lr=0.1, **IMPLS[impl])
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = harness.make_grad(p, "partial", gen)  # element 0 is 1: the probe settles it
    opt.step()  # state allocation happens once, outside the count
    with syncs() as seen:
        opt.step()
    assert len(seen) == 1, seen
    for p, kind in zip(params, ["dense", "zero", "partial", "negzero", "subnormal", "none"]):
        p.grad = harness.make_grad(p, kind, gen)
    before = harness.snapshot(opt, params)
    with syncs() as seen:
        opt.step()
    assert len(seen) == 2, seen
    harness.assert_unchanged(before, opt, params, [1, 3, 5], "idle")


@pytest.mark.parametrize("cls", [safeopt.Adam, safeopt.AdamW], ids=["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_capturable_step_never_synchronises_and_matches_torch(cls: type, dtype: torch.dtype) -> None:
    params = harness.make_params(SHAPES, dtype=dtype, device="cuda")
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    kwargs: dict[str, Any] = {"lr": 0.01, "weight_decay": 0.1, "fused": True, "capturable": True}
    opt = cls(params, **kwargs)
    ref = getattr(torch.optim, cls.__name__)(ref_params, **kwargs)
    opt.freeze(params[-1])
    gen = torch.Generator().manual_seed(0)
    kinds = ["dense", "zero", "none", "negzero", "nan", "partial"]
    for step in range(6):
        turn = kinds[step:] + kinds[:step]
        grads = [harness.make_grad(p, kind, gen) for p, kind in zip(params, turn)]
        active = [harness.expected_active(g, frozen=i == len(params) - 1) for i, g in enumerate(grads)]
        for p, g in zip(params, grads):
            p.grad = g
        before = harness.snapshot(opt, params)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        harness.reference_step(ref, ref_params, grads, active)
        idle = [i for i, a in enumerate(active) if not a]
        harness.assert_unchanged(before, opt, params, idle, f"step {step}")
        harness.assert_matches_reference(opt, params, ref, ref_params, range(len(params)), f"step {step}")


def _graph_case(
    make: Callable[[list[nn.Parameter]], torch.optim.Optimizer], torch_cls: type, kwargs: dict[str, Any]
) -> None:
    """torch's whole-step capture recipe with static grads; each replay leaves another branch idle,
    and the result equals torch stepping only the active parameters, eagerly."""
    params = harness.make_params(SHAPES, device="cuda")
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    opt = make(params)
    ref = torch_cls(ref_params, **kwargs)
    static = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, static):
        p.grad = g
    gen = torch.Generator(device="cuda").manual_seed(0)

    def fill(idle: set[int]) -> list[bool]:
        for i, g in enumerate(static):
            if i in idle:
                g.zero_()
            else:
                g.copy_(torch.randn(g.shape, generator=gen, device="cuda"))
        return [i not in idle for i in range(len(static))]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: every parameter active once, so all state exists
        for _ in range(2):
            active = fill(set())
            opt.step()
            harness.reference_step(ref, ref_params, static, active)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    branches = [{0, 1}, {2, 3}, set(), {0, 1, 2, 3, 4, 5}, {1, 4}]
    for replay, idle in enumerate(branches * 2):
        active = fill(idle)
        before = harness.snapshot(opt, params)
        graph.replay()
        torch.cuda.synchronize()
        harness.reference_step(ref, ref_params, static, active)
        what = f"replay {replay} (idle {sorted(idle)})"
        harness.assert_unchanged(before, opt, params, sorted(idle), what)
        harness.assert_matches_reference(opt, params, ref, ref_params, range(len(params)), what)
        assert all(p.grad is g for p, g in zip(params, static)), "a static grad was replaced"


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_cuda_graph_replays_follow_the_idle_set_of_each_replay(name: str, amsgrad: bool) -> None:
    kwargs = {"lr": 0.01, "weight_decay": 0.1, "amsgrad": amsgrad, "fused": True, "capturable": True}
    _graph_case(lambda ps: getattr(safeopt, name)(ps, **kwargs), getattr(torch.optim, name), kwargs)


def test_cuda_graph_replays_of_fused_sgd_with_momentum() -> None:
    kwargs = {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.01, "fused": True}
    _graph_case(lambda ps: safeopt.SGD(ps, **kwargs), torch.optim.SGD, kwargs)


def test_cuda_graph_replays_through_wrap() -> None:
    kwargs = {"lr": 0.01, "fused": True, "capturable": True}
    _graph_case(lambda ps: safeopt.wrap(torch.optim.Adam(ps, **kwargs)), torch.optim.Adam, kwargs)


def test_capture_of_a_foreach_step_is_refused_with_the_fix() -> None:
    params = harness.make_params(SHAPES, device="cuda")
    opt = safeopt.Adam(params, lr=0.01, foreach=True, capturable=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="fused=True"), torch.cuda.graph(graph):
        opt.step()


@pytest.mark.parametrize("impl", ["fused", "fused_capturable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_scaler_skips_inf_steps_and_keeps_idle_parameters(impl: str, dtype: torch.dtype) -> None:
    """fp16 autocast with GradScaler: steps with an inf are skipped whole; in the others the idle
    branch holds still and the used branch equals torch stepping only it."""

    def run(lazy: bool) -> list[Any]:
        torch.manual_seed(0)
        used, idle = nn.Linear(16, 8).cuda().to(dtype), nn.Linear(16, 8).cuda().to(dtype)
        kwargs: dict[str, Any] = {"lr": 0.01, "weight_decay": 0.1, "fused": True}
        if impl == "fused_capturable":
            kwargs["capturable"] = True
        if lazy:
            opt: torch.optim.Optimizer = safeopt.AdamW([*used.parameters(), *idle.parameters()], **kwargs)
        else:
            opt = torch.optim.AdamW(used.parameters(), **kwargs)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10, growth_interval=2)
        out: list[Any] = []
        for step in range(6):
            opt.zero_grad(set_to_none=False)
            x = torch.randn(4, 16, device="cuda", generator=torch.Generator(device="cuda").manual_seed(step))
            with torch.autocast("cuda", dtype=torch.float16):
                loss = (used(x.to(dtype)) + 0.0 * idle(x.to(dtype))).float().pow(2).mean()
            scaler.scale(loss).backward()
            if step == 3:
                used.weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
            out.append([p.detach().clone() for p in used.parameters()] + [scaler.get_scale()])
            out[-1] += [v.clone() for p in used.parameters() for v in opt.state[p].values()]
        if lazy:
            for p in idle.parameters():
                state = opt.state.get(p, {})
                assert all(float(v) == 0 if k == "step" else not v.any() for k, v in state.items())
        return out

    mine, theirs = run(True), run(False)
    for step, (a, b) in enumerate(zip(mine, theirs)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert harness.bit_equal(x, y) if isinstance(x, torch.Tensor) else x == y, f"step {step}"
    assert harness.bit_equal(mine[3][0], mine[2][0]), "the inf step was not skipped"
