"""What a step asks of an accelerator, counted on the CPU: kernel launches and host reads.

Every aten op that is not a view is at least one kernel launch on a GPU, and ``_local_scalar_dense``
/ ``Tensor.tolist`` are host reads (``safeopt._bench.count_launches``). Counted on GPT-2 small's
148 parameter tensors (its shapes at a width of 8: the counts depend on the number of tensors, not
their sizes), torch's step against safeopt's with the same arguments:

- fused+capturable: one fused kernel call per tensor whose grad may be zero, the rest a constant;
  no host read;
- the eager steps decided as on an accelerator (``_rule.FORCE_DEVICE``): torch's launches plus a
  constant, one host read when every grad is active (two when some are idle).

Each count is checked together with the step's result: safeopt's step equals torch's step on the
active parameters, and the idle ones are untouched.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import harness
import safeopt
from safeopt import _rule
from safeopt._bench import count_launches


def gpt2_small_shapes(width: int = 8, vocab: int = 64, context: int = 16) -> list[tuple[int, ...]]:
    """GPT-2 small's 148 parameter tensors in state_dict order (12 blocks of 12), scaled down."""
    block = [
        (width,),  # ln_1
        (width,),
        (width, 3 * width),  # attn.c_attn
        (3 * width,),
        (width, width),  # attn.c_proj
        (width,),
        (width,),  # ln_2
        (width,),
        (width, 4 * width),  # mlp.c_fc
        (4 * width,),
        (4 * width, width),  # mlp.c_proj
        (width,),
    ]
    return [(vocab, width), (context, width), *[s for _ in range(12) for s in block], (width,), (width,)]


SHAPES = gpt2_small_shapes()
N = len(SHAPES)
# The last 6 of the 12 blocks idle (all-zero grads): the half-idle case of the issue.
HALF_IDLE = set(range(2 + 6 * 12, 2 + 12 * 12))

IMPLS: dict[str, dict[str, Any]] = {
    "fused": {"fused": True},
    "foreach": {"foreach": True},
    "fused+capturable": {"fused": True, "capturable": True},
}


def _twins(
    cls: str, impl: str, idle: set[int], amsgrad: bool = False
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer, list[nn.Parameter], list[nn.Parameter]]:
    """safeopt's and torch's optimizer over copies of the same parameters, one step taken (state
    allocated); torch's parameters hold grads only where safeopt's are active."""
    params = harness.make_params(SHAPES)
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    gen = torch.Generator().manual_seed(1)
    for i, (p, q) in enumerate(zip(params, ref_params)):
        p.grad = torch.zeros_like(p) if i in idle else harness.make_grad(p, "dense", gen)
        q.grad = None if i in idle else p.grad.clone()  # type: ignore[union-attr]  # set just above
    kwargs = {"lr": 1e-3, "weight_decay": 0.01, "amsgrad": amsgrad, **IMPLS[impl]}
    opt = getattr(safeopt, cls)(params, **kwargs)
    ref = getattr(torch.optim, cls)(ref_params, **kwargs)
    opt.step()
    ref.step()
    return opt, ref, params, ref_params


def _check_result(
    opt: torch.optim.Optimizer,
    ref: torch.optim.Optimizer,
    params: list[nn.Parameter],
    ref_params: list[nn.Parameter],
    idle: set[int],
    before: Any,
) -> None:
    harness.assert_unchanged(before, opt, params, sorted(idle), "idle")
    active = [i for i in range(N) if i not in idle]
    harness.assert_matches_reference(opt, params, ref, ref_params, active, "active")


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
@pytest.mark.parametrize("idle", [set(), HALF_IDLE], ids=["all-active", "half-idle"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_capturable_step_launches_one_kernel_per_tensor_and_reads_nothing(
    cls: str, idle: set[int], amsgrad: bool
) -> None:
    """The floor of a per-tensor skip with torch's kernels: one fused call per tensor whose grad
    may be zero; the step counts advanced (by one minus each call's found_inf) in one
    multi-tensor op; the skip flags in a constant number of kernels. Before: three launches per tensor (torch's whole step
    per tensor)."""
    opt, ref, params, ref_params = _twins(cls, "fused+capturable", idle, amsgrad)
    theirs = count_launches(ref.step)
    before = harness.snapshot(opt, params)
    ours = count_launches(opt.step)
    assert theirs.reads == 0 and ours.reads == 0, f"host reads: torch {theirs.reads}, safeopt {ours.reads}"
    assert ours.launches <= theirs.launches + N + 8, f"{ours.launches} launches: {ours.ops}"
    kernel = "aten._fused_adamw_.default" if cls == "AdamW" else "aten._fused_adam_.default"
    assert ours.ops[kernel] == N
    assert ours.ops["aten._foreach_add_.List"] == 1, "the step counts not advanced in one op"
    _check_result(opt, ref, params, ref_params, idle, before)


def test_capturable_step_with_a_grad_scaler_found_inf_stays_at_the_floor() -> None:
    """GradScaler's found_inf is combined with each tensor's flag on the device: still one kernel
    call per tensor and no host read; with found_inf = 1 nothing moves, step counts included."""
    opt, ref, params, ref_params = _twins("AdamW", "fused+capturable", HALF_IDLE)
    for o in (opt, ref):
        o.grad_scale = torch.tensor(1.0)  # type: ignore[attr-defined]  # GradScaler's attributes
        o.found_inf = torch.tensor(0.0)  # type: ignore[attr-defined]
    theirs = count_launches(ref.step)
    before = harness.snapshot(opt, params)
    ours = count_launches(opt.step)
    assert ours.reads == 0
    assert ours.launches <= theirs.launches + N + 8, f"{ours.launches} launches: {ours.ops}"
    _check_result(opt, ref, params, ref_params, HALF_IDLE, before)
    opt.found_inf = torch.tensor(1.0)  # type: ignore[attr-defined]  # GradScaler's attribute
    before = harness.snapshot(opt, params)
    opt.step()
    harness.assert_unchanged(before, opt, params, range(N), "found_inf = 1")


@pytest.mark.parametrize("impl", ["fused", "foreach"])
@pytest.mark.parametrize("idle", [set(), HALF_IDLE], ids=["all-active", "half-idle"])
def test_eager_device_decision_adds_a_constant(
    monkeypatch: pytest.MonkeyPatch, impl: str, idle: set[int]
) -> None:
    """The eager step decided as on an accelerator: torch's launches plus a constant per device and
    dtype, and one host read (two with idle grads: the first-element probe cannot prove them)."""
    monkeypatch.setattr(_rule, "FORCE_DEVICE", True)
    opt, ref, params, ref_params = _twins("AdamW", impl, idle)
    theirs = count_launches(ref.step)
    before = harness.snapshot(opt, params)
    ours = count_launches(opt.step)
    assert ours.launches <= theirs.launches + 8, (
        f"{ours.launches} launches against {theirs.launches}: {ours.ops}"
    )
    assert ours.reads <= theirs.reads + (2 if idle else 1), f"{ours.reads} reads against {theirs.reads}"
    _check_result(opt, ref, params, ref_params, idle, before)


def test_the_counter_counts_launches_and_reads() -> None:
    """torch's fused+capturable AdamW step is two launches (step counts, kernel) and no read; a
    read of a value is counted, by ``item`` and by ``tolist``; views are not launches."""
    params = harness.make_params(SHAPES)
    for p in params:
        p.grad = torch.ones_like(p)
    opt = torch.optim.AdamW(params, fused=True, capturable=True)
    opt.step()
    counted = count_launches(opt.step)
    assert (counted.launches, counted.reads) == (2, 0), counted.ops
    t = torch.ones(3)
    counted = count_launches(lambda: (t[0].item(), t.tolist(), t.view(3, 1), t.add(1)))
    assert (counted.launches, counted.reads, counted.ops) == (1, 2, {"aten.add.Tensor": 1})


@pytest.mark.parametrize("impl", ["fused", "foreach"])
@pytest.mark.parametrize("idle", [set(), HALF_IDLE], ids=["all-active", "half-idle"])
def test_eager_device_decision_at_its_floor(
    monkeypatch: pytest.MonkeyPatch, impl: str, idle: set[int]
) -> None:
    """One device, one dtype: the probe round is one stack of the first elements, read; the full
    round (only with idle grads) one ``_foreach_norm`` and one stack, read. The flags are compared
    with zero on the host, not by a kernel each round. Before: 3 and 4 more launches."""
    monkeypatch.setattr(_rule, "FORCE_DEVICE", True)
    opt, ref, _, _ = _twins("AdamW", impl, idle)
    theirs = count_launches(ref.step)
    ours = count_launches(opt.step)
    decision = {"aten.stack.default": 2 if idle else 1, **({"aten._foreach_norm.Scalar": 1} if idle else {})}
    extra = {op: ours.ops.get(op, 0) - theirs.ops.get(op, 0) for op in set(ours.ops) | set(theirs.ops)}
    assert {op: n for op, n in extra.items() if n} == decision, f"{ours.ops} against torch's {theirs.ops}"


@pytest.mark.parametrize("found_inf", [0.0, 1.0])
def test_capturable_lazy_false_group_beside_flagged_ones_with_a_grad_scaler(found_inf: float) -> None:
    """A lazy=False group's parameters share one kernel call with the GradScaler's found_inf (its
    step counts advanced by one minus it), beside the per-tensor calls of a lazy group: torch's
    result either way, nothing moved on an inf step."""
    params = harness.make_params([(3,), (4, 2), (2,), (5,)])
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    kwargs = {"lr": 0.1, "weight_decay": 0.1, "fused": True, "capturable": True}
    opt = safeopt.AdamW([{"params": params[:2], "lazy": False}, {"params": params[2:]}], **kwargs)
    ref = torch.optim.AdamW([{"params": ref_params[:2]}, {"params": ref_params[2:]}], **kwargs)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        grads = [
            torch.zeros(3),
            harness.make_grad(params[1], "dense", gen),
            harness.make_grad(params[2], "dense", gen),
        ]
        grads.append(torch.zeros(5) if step != 1 else harness.make_grad(params[3], "dense", gen))
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g, g.clone()  # type: ignore[union-attr]  # every grad is a tensor here
        if step != 1:
            ref_params[3].grad = None  # idle under the lazy rule
        for o in (opt, ref):
            o.grad_scale = torch.tensor(2.0)  # type: ignore[attr-defined]  # GradScaler's attributes
            o.found_inf = torch.tensor(found_inf if step == 2 else 0.0)  # type: ignore[attr-defined]
        before = harness.snapshot(opt, params)
        counted = count_launches(opt.step)
        ref.step()
        assert counted.reads == 0
        assert counted.ops["aten._fused_adamw_.default"] == 3, counted.ops  # lazy=False group, then one each
        harness.assert_matches_reference(opt, params, ref, ref_params, range(4), f"step {step}")
        if step == 2 and found_inf:
            harness.assert_unchanged(before, opt, params, range(4), "inf step")
