"""The seams in safeopt/_torch_compat.py, checked against the installed torch.

One canary per reliance on torch internals: when a torch release changes one, its test fails
and names the torch version (``TORCH``), before a user's training run finds out.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.testing._internal.common_optimizers import optim_db

import cases
import harness
import safeopt
from safeopt._torch_compat import (
    _GROUP_OPTION_ARGS,
    ADAM_LISTS,
    HOOK_DICTS,
    INSTANCE_ATTRS,
    MOMENTUM_BUFFER,
    STEP,
    _init_group_outputs,
    allocate_state,
    batches,
    capture_health_check,
    fused_adam_kernel,
    fused_adam_options,
    gather,
    saved_as_is,
    settle,
    skip_flag,
    skips_by_found_inf,
    twin,
    unhooked,
    writes_into_grads,
)

TORCH = torch.__version__


def test_step_hooks_run_once_even_when_torch_class_is_hooked() -> None:
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])  # torch hooks Adam.step on first use
    assert getattr(torch.optim.Adam.step, "hooked", False), f"torch {TORCH} no longer marks hooked steps"
    assert hasattr(torch.optim.Adam.step, "__wrapped__"), f"torch {TORCH}'s step wrapper keeps no __wrapped__"
    assert unhooked(torch.optim.Adam.step) is not torch.optim.Adam.step

    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    opt = safeopt.Adam([p])
    calls: list[str] = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    handle = register_optimizer_step_pre_hook(lambda *_: calls.append("global"))
    try:
        opt.step()
    finally:
        handle.remove()
    assert calls == ["global", "pre", "post"], f"torch {TORCH}: hooks ran as {calls}"


@pytest.mark.parametrize(
    "torch_cls",
    sorted(
        {info.optim_cls for info in optim_db if hasattr(info.optim_cls, "_init_group")},
        key=lambda c: c.__name__,
    ),
    ids=lambda c: c.__name__,
)
def test_init_group_signature_is_understood(torch_cls: type) -> None:
    """allocate_state calls ``_init_group(group, *outputs)``: every output a list, but for the group
    options it knows (torch 2.6's AdamW takes ``amsgrad``). Otherwise it silently allocates nothing."""
    outputs = _init_group_outputs(torch_cls)
    sig = inspect.signature(torch_cls._init_group)
    assert outputs is not None, (
        f"torch {TORCH}: {torch_cls.__name__}._init_group{sig} is not (self, group, *lists)"
    )
    p = torch.nn.Parameter(torch.ones(2, 2))
    p.grad = torch.ones(2, 2)
    opt = torch_cls([p])
    group = opt.param_groups[0]
    args = [group[n] if n in _GROUP_OPTION_ARGS and n in group else [] for n in outputs]
    with torch.no_grad():
        torch_cls._init_group(opt, group, *args)
    lists = [a for a in args if isinstance(a, list)]
    assert lists and all(len(a) in (0, 1) for a in lists), (
        f"torch {TORCH}: {torch_cls.__name__}._init_group{sig}"
    )
    assert lists[0] == [p] or lists[1] == [p.grad], (
        f"torch {TORCH}: {torch_cls.__name__}._init_group{sig} no longer gathers the parameters first"
    )


def test_default_to_fused_or_foreach_is_there() -> None:
    """writes_into_grads asks torch which implementation a group without ``foreach`` gets."""
    from torch.optim import optimizer

    assert hasattr(optimizer, "_default_to_fused_or_foreach"), (
        f"torch {TORCH} moved _default_to_fused_or_foreach"
    )
    fused, foreach = optimizer._default_to_fused_or_foreach([torch.zeros(1)], False, use_fused=False)
    assert (fused, foreach) == (False, False), (
        f"torch {TORCH}: CPU tensors default to fused={fused}, foreach={foreach}"
    )


@pytest.mark.parametrize("case", cases.params(where=lambda c: c.impl in ("forloop", "fused")))
def test_allocated_state_is_what_torch_allocates(case: cases.Case) -> None:
    """Keys, dtypes, devices and shapes as after torch's own first step; values untouched by it."""
    (p,) = harness.make_params([(3, 2)])
    (q,) = harness.make_params([(3, 2)])
    p.grad, q.grad = torch.zeros(3, 2), torch.ones(3, 2)
    opt, ref = case.make_torch([p]), case.make_torch([q])
    allocate_state(opt, opt.param_groups[0], [p])
    ref.step()
    mine, theirs = opt.state[p], ref.state[q]
    if not theirs or isinstance(opt, torch.optim.SGD):
        assert not mine  # SGD's buffer is created by its first update, not before
        return
    assert set(mine) == set(theirs), (
        f"torch {torch.__version__}: {case.id}: {sorted(mine)} != {sorted(theirs)}"
    )
    for key in mine:
        a, b = mine[key], theirs[key]
        if isinstance(b, torch.Tensor):
            assert (a.dtype, a.device, a.shape) == (b.dtype, b.device, b.shape), key
    harness.assert_fresh(mine, p, case.id)


@pytest.mark.parametrize(
    "case", cases.params(twins_only=True, where=lambda c: c.torch_cls is torch.optim.SGD)
)
def test_writes_into_grads_predicts_torch(case: cases.Case) -> None:
    """The predicate is True exactly when torch's step would change the caller's grads."""
    params = harness.make_params([(4,), (2, 2)], requires_grad=case.impl != "differentiable")
    opt = case.make_torch(params)
    changed = False
    for _ in range(2):  # the second step is the one with a momentum buffer
        grads = [torch.randn(p.shape) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        changed |= not all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    assert writes_into_grads(opt, opt.param_groups[0], params) == changed


def test_fused_sgd_still_needs_batches() -> None:
    """If torch fixes its mixed-buffer TypeError, batches() can go back to one batch."""
    a, b = harness.make_params([(3,), (3,)])
    opt = torch.optim.SGD([a, b], lr=0.1, momentum=0.9, fused=True)
    a.grad = torch.ones(3)
    opt.step()
    b.grad = torch.ones(3)
    with pytest.raises(TypeError):
        opt.step()  # if this passes, torch fixed it: batches() can go back to one batch
    assert batches(opt, opt.param_groups[0], [a, b]) == [[a], [b]]
    assert batches(opt, opt.param_groups[0], [a]) == [[a]]


FOUND_INF_CASES = {
    "Adam": (torch.optim.Adam, {"fused": True, "capturable": True, "amsgrad": True, "weight_decay": 0.1}),
    "AdamW": (torch.optim.AdamW, {"fused": True, "weight_decay": 0.1}),
    "SGD": (torch.optim.SGD, {"fused": True, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}),
}


@pytest.mark.parametrize("name", FOUND_INF_CASES)
def test_fused_step_skips_a_call_whose_found_inf_is_one(name: str) -> None:
    """skips_by_found_inf: the capturable step gives each parameter a torch call of its own with
    ``optimizer.found_inf`` set. torch's fused kernels must skip the whole call at 1 (Adam's step
    count back where it was), and a call at 0 must equal a call without found_inf, bit for bit."""
    torch_cls, kwargs = FOUND_INF_CASES[name]

    def stepped(
        found_inf: float | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.optim.Optimizer]:
        p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
        opt = torch_cls([p], **kwargs)
        assert skips_by_found_inf(opt, opt.param_groups[0]), f"torch {TORCH}: {name} fused lost found_inf"
        p.grad = torch.tensor([0.5, 0.25, -1.0])
        opt.step()  # state exists (SGD's momentum buffer too)
        before = (p.detach().clone(), harness.clone_state(opt.state[p]))
        if found_inf is not None:
            opt.found_inf = torch.tensor(found_inf)  # type: ignore[attr-defined]
        opt.step()
        if found_inf == 1.0:
            assert harness.bit_equal(p.detach(), before[0]), (
                f"torch {TORCH}: found_inf=1 moved {name}'s param"
            )
            harness.assert_state_equal(
                opt.state[p], before[1], f"torch {TORCH}: {name} state with found_inf=1"
            )
        return p.detach().clone(), harness.clone_state(opt.state[p]), opt

    stepped(1.0)
    plain, zero = stepped(None), stepped(0.0)
    assert harness.bit_equal(plain[0], zero[0]), f"torch {TORCH}: {name} with found_inf=0 differs"
    harness.assert_state_equal(zero[1], plain[1], f"torch {TORCH}: {name} state with found_inf=0")


def test_the_instance_attributes_wrap_shares_are_the_ones_torch_keeps() -> None:
    """wrap() shares INSTANCE_ATTRS with the optimizer it wraps: a hook dict torch adds (or
    renames) would stay on the wrapper alone, and hooks registered there would not run."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([p], fused=True)
    kept = set(vars(opt))
    assert {k for k in kept if k.startswith("_optimizer_")} == set(HOOK_DICTS), f"torch {TORCH}"
    assert {"param_groups", "state", "defaults", "_step_supports_amp_scaling"} <= kept, f"torch {TORCH}"
    assert set(INSTANCE_ATTRS) - kept == {"grad_scale", "found_inf"}, f"torch {TORCH}"
    seen: dict[str, bool] = {}
    real = opt.step

    def step(*args: object, **kwargs: object) -> object:
        seen.update((name, name in vars(opt)) for name in ("grad_scale", "found_inf"))
        return real(*args, **kwargs)

    opt.step = step  # type: ignore[method-assign]
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale((p * 2).sum()).backward()
    scaler.step(opt)
    assert seen == {"grad_scale": True, "found_inf": True}, f"torch {TORCH}: GradScaler sets {seen}"


@pytest.mark.parametrize("torch_cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD])
def test_the_state_keys_safeopt_reads(torch_cls: type) -> None:
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch_cls([p], lr=0.1, **({"momentum": 0.9} if torch_cls is torch.optim.SGD else {}))
    p.grad = torch.ones(2)
    opt.step()
    if torch_cls is torch.optim.SGD:
        assert set(opt.state[p]) == {MOMENTUM_BUFFER}, f"torch {TORCH}: {sorted(opt.state[p])}"
    else:
        assert STEP in opt.state[p] and torch.is_tensor(opt.state[p][STEP]), f"torch {TORCH}"
        assert float(opt.state[p][STEP]) == 1


def test_load_casts_extra_state_to_the_parameter_dtype_and_saved_as_is_undoes_it() -> None:
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones_like(p)
    opt.step()
    saved = opt.state_dict()
    count = torch.tensor([257.0, 1.0])  # 257 has no bfloat16
    saved["state"][0]["count"] = count
    opt.load_state_dict(saved)
    assert opt.state[p]["count"].dtype == torch.bfloat16, f"torch {TORCH} no longer casts on load"
    saved_as_is(opt, saved, "count", torch.float32)
    assert harness.bit_equal(opt.state[p]["count"], count)


@pytest.mark.parametrize("torch_cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD])
def test_fused_kernels_skip_when_found_inf_is_one_and_sgd_starts_its_buffer_anyway(torch_cls: type) -> None:
    """``skip_flag`` compares as the kernels do (1 skips; 2, a two-device sum, and 0.5 do not),
    and torch's fused SGD leaves a momentum buffer behind a skipped first step (``safeopt._amp``
    takes it out again)."""
    kwargs = {"momentum": 0.9} if torch_cls is torch.optim.SGD else {}
    for found_inf in (1.0, 2.0, 0.5, 0.0):
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.ones(3)
        opt = torch_cls([p], lr=0.1, fused=True, **kwargs)
        opt.found_inf = torch.tensor(found_inf)
        opt.step()
        flag = skip_flag(opt)
        assert flag is not None
        assert bool(flag) == harness.bit_equal(p.detach(), torch.ones(3)), (
            f"torch {TORCH}, found_inf {found_inf}"
        )
        if torch_cls is torch.optim.SGD and found_inf == 1.0:
            assert MOMENTUM_BUFFER in opt.state[p], (
                f"torch {TORCH}: a skipped first step starts no buffer now"
            )
    assert skip_flag(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)) is None


class _OwnStep(torch.optim.Adam):
    def step(self, closure: Any = None) -> Any:
        return super().step(closure)


def test_fused_adam_kernel_is_found_for_torchs_own_fused_step_only() -> None:
    """The capturable step calls torch's fused kernels itself only where torch's step would call
    them: torch's own Adam/AdamW step, fused; a step of a subclass's own runs whole."""
    p = torch.nn.Parameter(torch.ones(2))
    for make, kernel in [
        (lambda: torch.optim.Adam([p], fused=True), torch._fused_adam_),
        (lambda: torch.optim.AdamW([p], fused=True), torch._fused_adamw_),
        (lambda: safeopt.Adam([p], fused=True, capturable=True), torch._fused_adam_),
        (lambda: safeopt.AdamW([p], fused=True), torch._fused_adamw_),
        (lambda: safeopt.wrap(torch.optim.AdamW([p], fused=True)).optimizer, torch._fused_adamw_),
    ]:
        opt = make()
        assert fused_adam_kernel(opt, opt.param_groups[0]) is kernel, f"torch {TORCH}: {opt!r}"
    for opt in [
        torch.optim.Adam([p], foreach=True),
        _OwnStep([p], fused=True),
        torch.optim.SGD([p], fused=True),
    ]:
        assert fused_adam_kernel(opt, opt.param_groups[0]) is None, f"torch {TORCH}: {opt!r}"


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW], ids=lambda c: c.__name__)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("scaler", [None, 0.0, 1.0], ids=["no-scaler", "found_inf=0", "found_inf=1"])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_fused_kernel_per_tensor_with_merged_step_counts_is_torchs_step(
    cls: type, amsgrad: bool, scaler: float | None, tensor_lr: bool
) -> None:
    """``gather`` + one kernel call per tensor (``fused_adam_options``), step counts advanced before and
    ``found_inf`` taken off after (as ``torch.optim.adam._fused_adam`` does per call), equals
    torch's step, bit for bit: the capturable step's construction."""
    shapes = [(3, 2), (4,), (2, 2, 2)]
    mine, theirs = harness.make_params(shapes), harness.make_params(shapes)
    gen = torch.Generator().manual_seed(3)
    for p, q in zip(mine, theirs):
        p.grad = harness.make_grad(p, "dense", gen)
        q.grad = p.grad.clone()  # type: ignore[union-attr]  # set just above
    lr = torch.tensor(0.01) if tensor_lr else 0.01
    kwargs = {"lr": lr, "weight_decay": 0.1, "amsgrad": amsgrad, "fused": True, "capturable": True}
    opt, ref = cls(mine, **kwargs), cls(theirs, **kwargs)
    if scaler is not None:
        for o in (opt, ref):
            o.grad_scale, o.found_inf = torch.tensor(2.0), torch.tensor(scaler)
    for _ in range(2):
        ref.step()
        group = opt.param_groups[0]
        kernel = fused_adam_kernel(opt, group)
        assert kernel is not None
        lists = gather(opt, group, mine)
        assert lists is not None and set(ADAM_LISTS) <= set(lists), f"torch {TORCH}: {lists and list(lists)}"
        tensors = [lists[name] for name in ADAM_LISTS]
        found_inf = getattr(opt, "found_inf", None)
        torch._foreach_add_(tensors[-1], 1)
        for i in range(len(mine)):
            kernel(
                *[[t[i]] if t else [] for t in tensors],
                lr=group["lr"],
                grad_scale=getattr(opt, "grad_scale", None),
                found_inf=found_inf,
                **fused_adam_options(group),
            )
        if found_inf is not None:
            torch._foreach_sub_(tensors[-1], [found_inf] * len(mine))
        for p, q in zip(mine, theirs):
            assert harness.bit_equal(p, q), f"torch {TORCH}: a parameter differs"
            harness.assert_state_equal(opt.state[p], ref.state[q], f"torch {TORCH}")


def test_capture_health_check_is_there() -> None:
    """torch's step starts with the capture health check (renamed in torch 2.13); the capturable
    step runs it once in torch's place."""
    opt = torch.optim.Adam([torch.nn.Parameter(torch.ones(1))], capturable=True)
    assert hasattr(opt, "_accelerator_graph_capture_health_check") or hasattr(
        opt, "_cuda_graph_capture_health_check"
    ), f"torch {TORCH} has no capture health check"
    capture_health_check(opt)


@pytest.mark.parametrize("torch_cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD])
@pytest.mark.parametrize("impl", ["forloop", "foreach", "fused"])
def test_torch_step_runs_on_a_twin_and_writes_no_group_key(torch_cls: type, impl: str) -> None:
    """twin(): torch's step reads the optimizer through ``self`` only, and settle() is all it needs
    to hand back; torch's own steps write no group key."""
    kwargs = {"lr": 0.1, "momentum": 0.9} if torch_cls is torch.optim.SGD else {"lr": 0.1}
    kwargs.update(
        {"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]
    )
    shown, hidden = harness.make_params([(3,), (2,)])
    alone = shown.detach().clone().requires_grad_()
    hidden_before = hidden.detach().clone()
    opt = torch_cls([shown, hidden], **kwargs)
    ref = torch_cls([alone], **kwargs)
    before = [dict(group) for group in opt.param_groups]
    for step in range(2):
        shown.grad, hidden.grad, alone.grad = torch.ones(3), torch.ones(2), torch.ones(3)
        copy = twin(opt, opt.param_groups)
        copy.param_groups[0]["params"] = [shown]
        unhooked(torch_cls.step)(copy)
        settle(opt, copy, opt.param_groups)
        ref.step()
        assert harness.bit_equal(shown.detach(), alone.detach()), f"torch {TORCH}, step {step}"
        assert not opt.state.get(hidden) and harness.bit_equal(hidden.detach(), hidden_before)
        harness.assert_state_equal(opt.state[shown], ref.state[alone], f"torch {TORCH}")
    assert opt.param_groups == before, f"torch {TORCH}'s step wrote a group key"
    assert vars(copy) == {"param_groups": [{}]}, "the twin keeps what the optimizer has"


def test_a_grad_changed_through_data_is_refused_by_the_setter_and_given_back() -> None:
    """give_back(): torch's p.grad setter checks dtype and size; a grad whose data was swapped
    passes them again while its data is a stand-in."""
    p = torch.nn.Parameter(torch.zeros(3))
    grad = torch.zeros(3)
    grad.data = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        p.grad = grad
    safeopt._lazy.give_back([(p, grad)])
    assert p.grad is grad and p.grad.dtype == torch.float64, f"torch {TORCH}"
