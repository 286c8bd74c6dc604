"""Issue 20, items 5, 6, 7 and 9: a failed step changes nothing, groups added behind safeopt's
back, other threads reading the optimizer during a step, and load_state_dict pre-hooks."""

from __future__ import annotations

import copy
import gc
import sys
import threading
import time
import weakref
from typing import Any

import pytest
import torch
from torch import nn

import harness
import safeopt
from safeopt._rows import ROW_STEP


def _state_bits(opt: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    return {id(p): harness.clone_state(s) for p, s in opt.state.items()}


def _assert_same_state(opt: torch.optim.Optimizer, before: dict[int, dict[str, Any]]) -> None:
    now = _state_bits(opt)
    assert set(now) == set(before), "the set of parameters with state changed"
    for key, state in before.items():
        harness.assert_state_equal(now[key], state, "state")


# 20.5: a failed step changes nothing safeopt did.


@pytest.mark.parametrize("how", ["twin", "wrap", "twin-rows"])
def test_failed_step_allocates_no_state(how: str) -> None:
    # torch's Adam refuses the active parameter's sparse grad, after safeopt gave the idle
    # parameter (a zero grad) torch's fresh state: that state must go again.
    idle, active = harness.make_params([(3, 2), (3,)])
    if how == "wrap":
        opt: torch.optim.Optimizer = safeopt.wrap(torch.optim.Adam([idle, active], lr=0.1))
    else:
        opt = safeopt.Adam([idle, active], lr=0.1, lazy="rows" if how == "twin-rows" else True)
    opt.state[idle]  # an empty entry (defaultdict) stays an empty entry
    before = _state_bits(opt)
    idle.grad = torch.zeros(3, 2)
    active.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    _assert_same_state(opt, before)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("change", ["dtype", "size"])
def test_wrap_gives_back_grads_the_setter_refuses(change: str, strict: bool) -> None:
    # A grad whose dtype or size was changed through .data: p.grad = grad refuses it, so the
    # wrapper must put it back another way, and put back every other grad too.
    odd, idle, active = harness.make_params([(3,), (3,), (3,)])
    ref = active.detach().clone().requires_grad_()
    w = safeopt.wrap(torch.optim.SGD([odd, idle, active], lr=0.1), strict=strict)
    odd.grad = torch.zeros(3)
    odd.grad.data = torch.zeros(3, dtype=torch.float64) if change == "dtype" else torch.zeros(5)
    idle.grad = torch.zeros(3)
    active.grad = torch.ones(3)
    grads = [odd.grad, idle.grad, active.grad]
    before = harness.snapshot(w, [odd, idle])
    w.step()  # torch's SGD steps the active parameter; the odd grad is idle (zero)
    assert all(p.grad is g for p, g in zip((odd, idle, active), grads))  # the same objects
    harness.assert_unchanged(before, w, [odd, idle], [0, 1])
    torch_opt = torch.optim.SGD([ref], lr=0.1)
    ref.grad = torch.ones(3)
    torch_opt.step()
    assert harness.bit_equal(active.detach(), ref.detach())


def test_grads_come_back_even_when_one_cannot() -> None:
    # A grad that no way can put back does not keep the later ones from coming back.
    from safeopt import _lazy

    a, b = harness.make_params([(3,), (3,)])
    ga, gb = torch.zeros(3), torch.zeros(3)

    class Refuses(nn.Parameter):
        def __setattr__(self, name: str, value: Any) -> None:
            if name == "grad" and value is not None:
                raise RuntimeError("refused")
            super().__setattr__(name, value)

    odd = Refuses(torch.zeros(3))
    with pytest.raises(RuntimeError, match="refused"):
        _lazy.give_back([(odd, torch.ones(3)), (a, ga), (b, gb)])
    assert a.grad is ga and b.grad is gb


# 20.6: groups that reach the optimizer behind safeopt's back are adopted with the defaults.


def _behind_back(how: str) -> tuple[torch.optim.Optimizer, nn.Parameter, nn.Parameter]:
    first, added = harness.make_params([(3,), (2, 2)], seed=1)
    if how == "inner.add_param_group":
        inner = torch.optim.Adam([first], lr=0.1)
        opt: torch.optim.Optimizer = safeopt.wrap(inner)
        inner.add_param_group({"params": [added]})
    elif how == "inner.load_state_dict":
        inner = torch.optim.Adam([first], lr=0.1)
        inner.add_param_group({"params": [added]})
        saved = copy.deepcopy(torch.optim.Adam([first.detach().clone(), added.detach().clone()]).state_dict())
        saved["param_groups"] = [
            {**saved["param_groups"][0], "params": [0]},
            {**saved["param_groups"][0], "params": [1]},
        ]
        opt = safeopt.wrap(inner)
        inner.load_state_dict(saved)
    elif how == "Optimizer.add_param_group":
        opt = safeopt.Adam([first], lr=0.1)
        torch.optim.Optimizer.add_param_group(opt, {"params": [added]})
    else:  # Optimizer.load_state_dict
        opt = safeopt.Adam([first], lr=0.1)
        opt.add_param_group({"params": [added]})
        saved = torch.optim.Adam([{"params": [first]}, {"params": [added]}], lr=0.1).state_dict()
        torch.optim.Optimizer.load_state_dict(opt, saved)
    if how != "Optimizer.load_state_dict":  # that one calls __setstate__, which safeopt fills
        missing = (
            ("frozen_params", "lazy", "frozen") if how.endswith("load_state_dict") else ("frozen_params",)
        )
        assert not any(key in opt.param_groups[1] for key in missing)
    return opt, first, added


HOW = [
    "inner.add_param_group",
    "inner.load_state_dict",
    "Optimizer.add_param_group",
    "Optimizer.load_state_dict",
]


@pytest.mark.parametrize("how", HOW)
def test_group_added_behind_the_back_is_adopted(how: str) -> None:
    opt, first, added = _behind_back(how)
    lr = opt.param_groups[1]["lr"]
    ref = added.detach().clone().requires_grad_()
    torch_opt = torch.optim.Adam([ref], lr=lr)
    assert not opt.is_frozen(added) and not opt.is_frozen(1)
    opt.state_dict()
    assert not safeopt.audit(nn.ParameterList([first, added]), opt)
    first.grad = torch.zeros(3)  # idle under the default lazy=True
    added.grad = ref.grad = torch.ones(2, 2)
    before = harness.snapshot(opt, [first])
    opt.step()
    torch_opt.step()
    harness.assert_unchanged(before, opt, [first], [0])
    assert harness.bit_equal(added.detach(), ref.detach())
    opt.freeze(added)
    assert opt.is_frozen(added)
    frozen = harness.snapshot(opt, [added])
    added.grad = torch.ones(2, 2)
    opt.step()
    harness.assert_unchanged(frozen, opt, [added], [0])
    opt.unfreeze(added)
    with opt.frozen(1):
        assert opt.is_frozen(added)
    assert not opt.is_frozen(added)
    # what it saves loads back into a fresh one
    again, _, _ = _behind_back(how)
    again.load_state_dict(opt.state_dict())


def test_adopted_group_with_a_bad_flag_is_refused_clearly() -> None:
    inner = torch.optim.Adam(harness.make_params([(3,)]), lr=0.1)
    w = safeopt.wrap(inner)
    (p,) = harness.make_params([(3,)], seed=2)
    inner.add_param_group({"params": [p], "lazy": "yes"})
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="Invalid lazy value: 'yes'"):
        w.step()


# 20.7: a step shows other threads the optimizer as it is, every group whole.


def _reader(opt: torch.optim.Optimizer, sizes: list[int], stop: threading.Event, seen: list[str]) -> None:
    while not stop.is_set():
        try:
            saved = opt.state_dict()
        except Exception as e:  # noqa: BLE001  # any failure is the finding
            seen.append(f"{type(e).__name__}: {e}")
            continue
        got = [len(g["params"]) for g in saved["param_groups"]]
        if got != sizes:
            seen.append(f"groups of {got}, expected {sizes}")
        held = {i for g in saved["param_groups"] for i in g["params"]}
        if not set(saved["state"]) <= held:
            seen.append(f"state for {sorted(set(saved['state']) - held)}")


@pytest.mark.parametrize("make", ["torch", "Adam", "Adam-rows", "SGD-fused", "Adam-capturable", "wrap"])
def test_state_dict_from_another_thread_during_steps(make: str) -> None:
    params = harness.make_params([(4, 3)] * 6 + [(5,)] * 6)
    groups = [{"params": params[:6]}, {"params": params[6:]}]
    if make == "torch":  # the reference: torch's own Adam under the same reader
        opt: torch.optim.Optimizer = torch.optim.Adam(groups, lr=0.1)
    elif make == "Adam":
        opt = safeopt.Adam(groups, lr=0.1)
    elif make == "Adam-rows":
        opt = safeopt.Adam(groups, lr=0.1, lazy="rows")
    elif make == "SGD-fused":  # two torch steps a group: started and new momentum buffers
        opt = safeopt.SGD(groups, lr=0.1, momentum=0.9, fused=True)
    elif make == "Adam-capturable":  # one torch step a parameter, skipped on the device when idle
        opt = safeopt.Adam(groups, lr=0.1, fused=True, capturable=True)
    else:  # wrap() hides grads, not parameters
        opt = safeopt.wrap(torch.optim.Adam(groups, lr=0.1))
    sizes = [6, 6]
    gen = torch.Generator().manual_seed(0)

    def grads(step: int) -> None:
        for i, p in enumerate(params):
            kind = "dense" if (i + step) % 3 else "zero"
            grad = harness.make_grad(p, kind, gen)
            if make == "Adam-rows" and p.dim() > 1 and grad is not None:
                grad[(step + i) % 4] = 0  # a row idle: the rows are gathered into buckets
            p.grad = grad

    # Every parameter gets its state in the first step (torch's own step adds the entries to
    # ``state`` while a reader may be iterating it, torch's Adam as much as safeopt's twins).
    grads(0)
    opt.step()
    stop, seen = threading.Event(), []
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    reader = threading.Thread(target=_reader, args=(opt, sizes, stop, seen))
    reader.start()
    try:
        # At least a second and 30 steps, however slow the machine (a loaded one steps rows slowly).
        deadline, step = time.monotonic() + 1.0, 1
        while step <= 30 or time.monotonic() < deadline:
            grads(step)
            opt.step()
            step += 1
    finally:
        stop.set()
        reader.join()
        sys.setswitchinterval(switch)
    assert not seen, f"{len(seen)} anomalies in {step} steps, first: {seen[0]}"


def test_settle_gives_the_optimizer_what_a_step_set_on_its_twin() -> None:
    from safeopt._torch_compat import settle, twin

    params = harness.make_params([(3,), (2,)])
    opt = torch.optim.Adam([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)
    opt.found_inf = torch.zeros(())  # type: ignore[attr-defined]  # GradScaler's attribute
    copy = twin(opt, opt.param_groups)
    copy.param_groups[1]["lr"] = 0.5  # as a step that writes a group key
    copy.param_groups[0]["calls"] = 1
    copy.counts = torch.ones(2)  # as a step that sets an attribute (a tensor ``==`` cannot answer)
    copy.found_inf = torch.ones(())  # the caller's own, not given back
    copy.param_groups[0]["params"] = []
    settle(opt, copy, opt.param_groups, own=("found_inf",))
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5] and opt.param_groups[0]["calls"] == 1
    assert torch.equal(opt.counts, torch.ones(2)) and float(opt.found_inf) == 0  # type: ignore[attr-defined]
    assert [g["params"] for g in opt.param_groups] == [params[:1], params[1:]]


def test_the_twin_keeps_no_optimizer_alive() -> None:
    # A step hook that refers to the optimizer: a twin that kept the optimizer's attributes (its
    # hook dicts) between steps would keep it alive.
    params = harness.make_params([(3,)])
    opt = safeopt.Adam(params, lr=0.1)
    lrs: list[float] = []
    opt.register_step_post_hook(lambda *_, held=opt: lrs.append(held.param_groups[0]["lr"]))
    params[0].grad = torch.ones(3)
    opt.step()
    assert lrs == [0.1]
    gone = weakref.ref(opt)
    del opt
    gc.collect()
    assert gone() is None


def test_a_compiled_step_compiles_torchs_step_once() -> None:
    # torch.compile guards torch's step on the optimizer it runs on: a new twin every step would
    # compile it again every step (up to the recompile limit, then run it eagerly).
    torch._dynamo.reset()
    model = nn.Linear(4, 2)
    opt = safeopt.Adam(model.parameters(), lr=0.1)
    x = torch.randn(3, 4)

    @torch.compile(backend="eager")
    def train() -> None:
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()

    for _ in range(3):
        train()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            train()
    torch._dynamo.reset()


# 20.9: the dict a load_state_dict pre-hook returns is the one loaded, row counts included.


def test_load_pre_hook_result_gives_row_counts() -> None:
    (table,) = harness.make_params([(4, 3)])
    opt = safeopt.Adam([table], lr=0.1, lazy="rows")
    for step in range(3):
        table.grad = torch.zeros(4, 3)
        table.grad[step % 2] = 1.0
        opt.step()
    saved = opt.state_dict()
    assert ROW_STEP in saved["state"][0]
    hooked = copy.deepcopy(saved)
    hooked["state"][0][ROW_STEP] = torch.tensor([7.0, 5.0, 0.0, 300.0])
    fresh = safeopt.Adam([table], lr=0.1, lazy="rows")
    fresh.register_load_state_dict_pre_hook(lambda optimizer, state_dict: hooked)
    fresh.load_state_dict(saved)
    assert harness.bit_equal(fresh.state[table][ROW_STEP], hooked["state"][0][ROW_STEP])
    assert fresh.state[table][ROW_STEP].dtype == torch.float32


def test_load_pre_hook_result_flags_are_checked() -> None:
    (p,) = harness.make_params([(3,)])
    opt = safeopt.Adam([p], lr=0.1)
    saved = opt.state_dict()
    bad = copy.deepcopy(saved)
    bad["param_groups"][0]["frozen_params"] = [4]
    opt.register_load_state_dict_pre_hook(lambda optimizer, state_dict: bad)
    with pytest.raises(ValueError, match="Invalid frozen_params"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["frozen_params"] == []
