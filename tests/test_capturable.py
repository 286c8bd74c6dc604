"""The decision on the device, proven on the CPU.

torch accepts ``Adam``/``AdamW(fused=True, capturable=True)`` on the CPU, and its step then reads
nothing on the host. safeopt's step on such an optimizer must not either: every way of reading a
tensor's data on the host is counted around ``step()``. ``_rule.FORCE_DEVICE`` makes the eager
step decide CPU grads as accelerator grads are decided, so the host reads of that path are counted
too. The refusals under CUDA-graph capture are checked with the capture test switched on
(``_capturable.capturing``); the bit-identity of these paths against torch over random models,
grads and freezes is in ``tests/test_properties.py`` (``CapturableMachine``, ``DeviceDecisionMachine``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import harness
import safeopt
from safeopt import _capturable, _rule

# aten ops that copy tensor data to the host.
HOST_READS = {
    "aten._local_scalar_dense.default",
    "aten.item.default",
    "aten.is_nonzero.default",
    "aten.equal.default",
}


class _DispatchReads(TorchDispatchMode):
    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if str(func) in HOST_READS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@contextmanager
def host_reads() -> Iterator[list[str]]:
    """Every read of tensor data on the host inside the block: aten's (``item``, ``bool()``,
    ``torch.equal``), ``Tensor.tolist`` (which bypasses the dispatcher on the CPU) and safeopt's
    direct memory probe of CPU grads."""
    seen: list[str] = []
    tolist = torch.Tensor.tolist

    def counted_tolist(self: torch.Tensor) -> Any:
        seen.append("Tensor.tolist")
        return tolist(self)

    def counted(read: Callable[[int], Any]) -> Callable[[int], Any]:
        def probe(address: int) -> Any:
            seen.append("memory probe")
            return read(address)

        return probe

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "tolist", counted_tolist)
        patch.setattr(
            _rule, "_PROBE", {k: (counted(read), *rest) for k, (read, *rest) in _rule._PROBE.items()}
        )
        with _DispatchReads(seen):
            yield seen


def _grads(params: list[nn.Parameter], step: int) -> list[torch.Tensor | None]:
    """Per step: an active, an all-zero, a None, a -0.0 and (from step 1) a NaN grad, rotating."""
    gen = torch.Generator().manual_seed(step)
    kinds = ["dense", "zero", "none", "negzero", "nan" if step else "partial"]
    kinds = kinds[step % len(kinds) :] + kinds[: step % len(kinds)]
    return [harness.make_grad(p, kind, gen) for p, kind in zip(params, kinds)]


MAKERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "Adam": lambda ps, **kw: safeopt.Adam(ps, **kw),
    "AdamW": lambda ps, **kw: safeopt.AdamW(ps, **kw),
    "wrap-Adam": lambda ps, **kw: safeopt.wrap(torch.optim.Adam(ps, **kw)),
}
TORCH = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW, "wrap-Adam": torch.optim.Adam}


@pytest.mark.parametrize("make", MAKERS)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_capturable_step_reads_nothing_on_the_host(
    monkeypatch: pytest.MonkeyPatch, make: str, amsgrad: bool
) -> None:
    shapes = [(4, 3), (5,), (2, 2), (3,), (6,)]
    params = harness.make_params(shapes)
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    kwargs = {"lr": 0.1, "weight_decay": 0.1, "amsgrad": amsgrad, "fused": True, "capturable": True}
    opt = MAKERS[make](params, **kwargs)
    ref = TORCH[make](ref_params, **kwargs)
    opt.freeze(params[4])
    for step in range(5):
        grads = _grads(params, step)
        active = [harness.expected_active(g, frozen=i == 4) for i, g in enumerate(grads)]
        for p, g in zip(params, grads):
            p.grad = g
        before = harness.snapshot(opt, params)
        with host_reads() as seen:
            opt.step()
        assert seen == [], f"step {step}: safeopt read {seen} on the host"
        harness.reference_step(ref, ref_params, grads, active)
        inactive = [i for i, a in enumerate(active) if not a]
        assert inactive and len(inactive) < len(params)
        harness.assert_unchanged(before, opt, params, inactive, f"step {step}")
        harness.assert_matches_reference(opt, params, ref, ref_params, range(len(params)), f"step {step}")


def test_torch_itself_reads_nothing_in_a_capturable_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The counter above sees what it should: torch's capturable step reads nothing, its
    non-capturable fused step with a tensor lr does, and so does safeopt's host decision."""
    params = harness.make_params([(3,), (2,)])
    for p in params:
        p.grad = torch.ones_like(p)
    plain = torch.optim.Adam(params, fused=True, capturable=True)
    plain.step()
    with host_reads() as seen:
        plain.step()
    assert seen == []
    lazy = safeopt.Adam(params, fused=True)  # not capturable: decided on the host
    params[1].grad = torch.zeros_like(params[1])
    with host_reads() as seen:
        lazy.step()
    assert "memory probe" in seen and "aten._local_scalar_dense.default" in seen


@pytest.mark.parametrize("probe", [True, False], ids=["probe", "no-probe"])
def test_eager_device_decision_reads_once_or_twice_per_device(
    monkeypatch: pytest.MonkeyPatch, probe: bool
) -> None:
    """Decided as on an accelerator: one read per device when the probe settles every grad (or
    without the probe round), two when some grads need the full reduction; never one per grad."""
    monkeypatch.setattr(_rule, "FORCE_DEVICE", True)
    monkeypatch.setattr(_rule, "DEVICE_PROBE", probe)
    params = harness.make_params([(4, 3), (5,), (2, 2), (3,), (6,), (7,)])
    opt = safeopt.Adam(params, lr=0.1, fused=True)
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = harness.make_grad(p, "dense", gen)
    for p in params:
        p.grad[(0,) * p.dim()] = 1.0  # the probe settles every grad
    opt.step()  # state allocation out of the count
    with host_reads() as seen:
        opt.step()
    assert seen == ["Tensor.tolist"]
    for p, kind in zip(params, ["zero", "negzero", "partial", "subnormal", "nan", "none"]):
        p.grad = harness.make_grad(p, kind, gen)
    before = harness.snapshot(opt, params)
    with host_reads() as seen:
        opt.step()
    assert seen == ["Tensor.tolist"] * (2 if probe else 1)
    harness.assert_unchanged(before, opt, params, [0, 1, 5], "idle")
    for i in (2, 3, 4):
        assert not harness.bit_equal(params[i].detach(), before[i][0]), f"param {i} did not step"


@contextmanager
def capturing() -> Iterator[None]:
    """The step believes a CUDA stream is capturing (the check is all that differs on the CPU)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_capturable, "capturing", lambda: True)
        yield


REFUSED = {
    "foreach": (lambda ps: safeopt.Adam(ps, foreach=True), "fused=True"),
    "forloop": (lambda ps: safeopt.Adam(ps, foreach=False), "fused=True"),
    "rows": (lambda ps: safeopt.Adam(ps, fused=True, lazy="rows"), 'lazy="rows"'),
    "strict": (lambda ps: safeopt.wrap(torch.optim.Adam(ps, fused=True), strict=True), "strict=False"),
    "sgd-first-step": (lambda ps: safeopt.SGD(ps, lr=0.1, momentum=0.9, fused=True), "warm-up steps"),
    "wrap-rmsprop": (lambda ps: safeopt.wrap(torch.optim.RMSprop(ps)), "fused=True"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_what_cannot_be_captured_exactly_is_refused_and_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    make, fix = REFUSED[name]
    params = harness.make_params([(3, 2), (4,)])
    opt = make(params)
    params[0].grad, params[1].grad = torch.ones(3, 2), torch.zeros(4)
    grads = [p.grad for p in params]
    before = harness.snapshot(opt, params)
    with capturing(), pytest.raises(RuntimeError, match="cannot capture") as info:
        opt.step()
    assert fix in str(info.value)
    assert all(p.grad is g for p, g in zip(params, grads)), "a grad was replaced"
    harness.assert_unchanged(before, opt, params, [0, 1], name)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fused_sgd_under_capture_skips_idle_parameters(
    monkeypatch: pytest.MonkeyPatch, momentum: float
) -> None:
    """SGD has no capturable option: it decides on the device only under capture. With momentum
    it needs every buffer started before capture (refused otherwise, tested above)."""
    params = harness.make_params([(3, 2), (4,), (5,)])
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    opt = safeopt.SGD(params, lr=0.1, momentum=momentum, weight_decay=0.01, fused=True)
    ref = torch.optim.SGD(ref_params, lr=0.1, momentum=momentum, weight_decay=0.01, fused=True)
    gen = torch.Generator().manual_seed(0)
    warm = [harness.make_grad(p, "dense", gen) for p in params]
    for p, q, g in zip(params, ref_params, warm):
        p.grad, q.grad = g, g.clone()
    opt.step()
    ref.step()
    for step in range(3):
        kinds = ["dense", "zero", "negzero"]
        grads = [harness.make_grad(p, kinds[(i + step) % 3], gen) for i, p in enumerate(params)]
        active = [harness.expected_active(g, frozen=False) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g
        before = harness.snapshot(opt, params)
        with capturing(), host_reads() as seen:
            opt.step()
        assert seen == []
        harness.reference_step(ref, ref_params, grads, active)
        harness.assert_unchanged(
            before, opt, params, [i for i, a in enumerate(active) if not a], f"step {step}"
        )
        harness.assert_matches_reference(opt, params, ref, ref_params, range(3), f"step {step}")


def test_capturable_lazy_false_group_steps_zero_grads_like_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lazy=False group is torch's behaviour: its zero grads step, in one call."""
    params = harness.make_params([(3,), (4,), (2,)])
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    kwargs = {"lr": 0.1, "weight_decay": 0.1, "fused": True, "capturable": True}
    opt = safeopt.Adam([{"params": params[:2], "lazy": False}, {"params": params[2:]}], **kwargs)
    ref = torch.optim.Adam([{"params": ref_params[:2]}, {"params": ref_params[2:]}], **kwargs)
    for p, q in zip(params, ref_params):
        p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
    ref_params[2].grad = None  # lazy: idle
    before = harness.snapshot(opt, params)
    with host_reads() as seen:
        opt.step()
    ref.step()
    assert seen == []
    harness.assert_unchanged(before, opt, params, [2], "lazy group")
    harness.assert_matches_reference(opt, params, ref, ref_params, range(3), "lazy=False group")
    assert not torch.equal(params[0].detach(), before[0][0]), "weight decay moved the lazy=False params"


class _OwnStepAdam(torch.optim.Adam):
    """A subclass with a step of its own: safeopt cannot call torch's kernels in its place."""

    def step(self, closure: Any = None) -> Any:
        return super().step(closure)


def test_capturable_step_keeps_grads_when_torch_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing call inside the per-parameter calls of torch's whole step leaves the groups and
    found_inf as they were."""
    params = harness.make_params([(3,), (4,)])
    opt = safeopt.wrap(_OwnStepAdam(params, fused=True, capturable=True))
    for p in params:
        p.grad = torch.ones_like(p)
    grads = [p.grad for p in params]
    groups = [list(g["params"]) for g in opt.param_groups]

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(importlib.import_module("torch.optim.adam"), "_fused_adam", boom)
    with pytest.raises(RuntimeError, match="kernel failed"):
        opt.step()
    monkeypatch.undo()
    assert [list(g["params"]) for g in opt.param_groups] == groups
    assert all(p.grad is g for p, g in zip(params, grads))
    assert "found_inf" not in vars(opt.optimizer)


def test_capturable_kernel_failing_leaves_the_parameters_not_reached_as_they_were(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The calls of torch's fused kernel, one per parameter: when one raises, the parameters it
    and the later calls did not step keep their values and state, step counts included."""
    params = harness.make_params([(3,), (4,), (2,)])
    opt = safeopt.Adam(params, fused=True, capturable=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    grads = [p.grad for p in params]
    before = harness.snapshot(opt, params)
    kernel = torch._fused_adam_
    calls = []

    def second_fails(*args: Any, **kwargs: Any) -> None:
        calls.append(args[0])
        if len(calls) == 2:
            raise RuntimeError("kernel failed")
        kernel(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adam_", second_fails)
    with pytest.raises(RuntimeError, match="kernel failed"):
        opt.step()
    monkeypatch.undo()
    assert len(calls) == 2, "not one call per parameter"
    assert all(p.grad is g for p, g in zip(params, grads))
    harness.assert_unchanged(before, opt, params, [1, 2], "after the failing call")
    assert float(opt.state[params[0]]["step"]) == 2.0


META = {
    "Adam-fused": (torch.optim.Adam, {"fused": True}),
    "SGD-fused": (torch.optim.SGD, {"lr": 0.1, "fused": True}),
    "AdamW-fused-capturable": (torch.optim.AdamW, {"fused": True, "capturable": True}),
    "Adam-foreach": (torch.optim.Adam, {"foreach": True}),
    "SGD-forloop": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "foreach": False}),
}


@pytest.mark.parametrize("name", META)
def test_meta_parameters_are_left_to_torch(name: str) -> None:
    """A grad without data (the meta device) is not read: its parameter is left to torch, which
    refuses it with its own error (fused kernels) or steps it (the others), and safeopt does the same."""
    torch_cls, kwargs = META[name]

    def run(make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> BaseException | None:
        p = nn.Parameter(torch.empty(3, device="meta"))
        p.grad = torch.empty(3, device="meta")
        opt = make([p])
        try:
            opt.step()
        except Exception as e:  # noqa: BLE001 - the error is the result compared
            return e
        assert opt.state[p], "the step made no state"
        return None

    theirs = run(lambda ps: torch_cls(ps, **kwargs))
    ours = run(lambda ps: getattr(safeopt, torch_cls.__name__)(ps, **kwargs))
    assert type(ours) is type(theirs) and str(ours) == str(theirs), (ours, theirs)
