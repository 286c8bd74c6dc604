"""torch.compile of safeopt's step, probed as a skeptical user would: the breaks found, pinned.

Each test compiles ``opt.step`` (``aot_eager`` or ``eager``: the bugs are in what dynamo traces,
not in a backend) on tiny tensors, and checks the contract with ``torch.equal``: an idle
parameter and all its state hold still, an active one matches torch's class compiled the same way
stepping only the active parameters.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import safeopt
from harness import assert_state_equal, assert_unchanged, bit_equal, snapshot


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def two_by_two_and_a_vector(seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(2, 2, generator=gen)), nn.Parameter(torch.randn(4, generator=gen))]


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [(safeopt.AdamW, {}), (safeopt.SGD, {"momentum": 0.9})],
    ids=["AdamW", "SGD-momentum"],
)
def test_rows_group_compiled_steps_the_parameters_active_in_each_step(cls: type, kwargs: Any) -> None:
    """lazy="rows", compiled, whole parameters active in turn (both, the table, the vector): each
    step moves exactly its active parameters. Before the fix dynamo traced the row planning
    (``RowSteps.prepare``) and, at the third step, replayed the second step's plan: the idle
    table moved (and counted a step) and the active vector did not."""
    params = two_by_two_and_a_vector()
    opt = cls(params, lr=0.05, lazy="rows", **kwargs)
    step = torch.compile(opt.step, backend="eager")
    gen = torch.Generator().manual_seed(1)
    for i, active in enumerate([[True, True], [True, False], [False, True], [True, True], [False, True]]):
        for p, on in zip(params, active):
            p.grad = torch.randn(p.shape, generator=gen) if on else torch.zeros_like(p)
        before = snapshot(opt, params)
        step()
        assert_unchanged(before, opt, params, [j for j, on in enumerate(active) if not on], f"step {i}")
        for j, on in enumerate(active):
            if on:
                assert not bit_equal(params[j].detach(), before[j][0]), (
                    f"step {i}: active param {j} did not move"
                )


@pytest.mark.parametrize("impl", [{"foreach": False}, {"foreach": True}], ids=["forloop", "foreach"])
def test_amsgrad_switched_on_after_a_compiled_idle_step(impl: dict[str, bool]) -> None:
    """A parameter idle in a compiled step (its state made there: zeros, step 0), then ``amsgrad``
    switched on, then its first update: torch's class compiled the same way, stepping only the
    active parameters, makes its state at that update, amsgrad included. Before the fix the
    compiled step raised ``KeyError: 'max_exp_avg_sq'`` (wrapped by dynamo)."""
    params, ref_params = two_by_two_and_a_vector(), two_by_two_and_a_vector()
    opt = safeopt.AdamW(params, lr=0.05, **impl)
    ref = torch.optim.AdamW(ref_params, lr=0.05, **impl)
    step = torch.compile(opt.step, backend="aot_eager")
    ref_step = torch.compile(ref.step, backend="aot_eager")
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(2, 2, generator=gen), torch.zeros(4)]
    params[0].grad, params[1].grad = grads[0].clone(), grads[1].clone()
    ref_params[0].grad, ref_params[1].grad = grads[0].clone(), None
    step()
    ref_step()
    for o in (opt, ref):
        o.param_groups[0]["amsgrad"] = True
    g = torch.randn(4, generator=gen)
    params[0].grad, params[1].grad = None, g.clone()
    ref_params[0].grad, ref_params[1].grad = None, g.clone()
    step()
    ref_step()
    assert bit_equal(params[1].detach(), ref_params[1].detach())
    assert_state_equal(opt.state[params[1]], ref.state[ref_params[1]], "the first update")
    # and on: both compiled steps take it from here with amsgrad
    g = torch.randn(4, generator=gen)
    params[1].grad, ref_params[1].grad = g.clone(), g.clone()
    step()
    ref_step()
    assert bit_equal(params[1].detach(), ref_params[1].detach())


def test_amsgrad_switched_on_after_a_compiled_idle_step_then_an_eager_update() -> None:
    """The same, the first update taken eagerly: safeopt's eager step on state a compiled step made
    while the parameter was idle equals torch's eager step on a new parameter. Before the fix it
    raised ``KeyError: 'max_exp_avg_sq'``."""
    params, ref_params = two_by_two_and_a_vector(), two_by_two_and_a_vector()
    opt = safeopt.Adam(params, lr=0.05, foreach=True)
    ref = torch.optim.Adam(ref_params, lr=0.05, foreach=True)
    params[0].grad, params[1].grad = torch.ones(2, 2), torch.zeros(4)
    ref_params[0].grad = torch.ones(2, 2)
    torch.compile(opt.step, backend="aot_eager")()
    with torch.compiler.set_stance("force_eager"):
        ref.step()
    for o in (opt, ref):
        o.param_groups[0]["amsgrad"] = True
    g = torch.randn(4, generator=torch.Generator().manual_seed(2))
    params[0].grad, params[1].grad = None, g.clone()
    ref_params[0].grad, ref_params[1].grad = None, g.clone()
    opt.step()
    ref.step()
    assert bit_equal(params[1].detach(), ref_params[1].detach())
    assert_state_equal(opt.state[params[1]], ref.state[ref_params[1]], "the first update")


def test_amsgrad_switched_on_after_real_updates_still_raises_torchs_error() -> None:
    """A parameter that was updated before ``amsgrad`` was switched on has no ``max_exp_avg_sq``:
    torch's step raises ``KeyError`` for it, compiled or not, and so does safeopt's (nothing is
    made up for it)."""
    params = two_by_two_and_a_vector()
    opt = safeopt.AdamW(params, lr=0.05, foreach=True)
    step = torch.compile(opt.step, backend="aot_eager")
    params[0].grad, params[1].grad = torch.ones(2, 2), torch.ones(4)
    step()
    opt.param_groups[0]["amsgrad"] = True
    with pytest.raises(Exception, match="max_exp_avg_sq"):
        step()
    with pytest.raises(KeyError, match="max_exp_avg_sq"):
        opt.step()


# torch 2.6's dynamo guards the frame before the compiled step's graph break on a group's float lr
# (``lr == value``) and compiles that frame again for every value: past the recompile limit the step
# runs eagerly, torch's eager bits rather than its compiled ones (docs/supported.md). Found on 2.6.0;
# 2.11, 2.13 and 2.14.1 pass.
OLD_DYNAMO_LR = pytest.mark.xfail(
    tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 7),
    reason="torch 2.6's dynamo compiles the frame before the step again for every float lr",
    strict=True,
)


@OLD_DYNAMO_LR
@pytest.mark.parametrize("make", ["twin", "wrap"])
def test_an_lr_scheduler_keeps_the_compiled_forloop_step_to_torchs_graphs(make: str) -> None:
    """A float lr changed every step by a scheduler, forloop AdamW with weight decay compiled with
    ``aot_eager``, one parameter idle every other step: torch's class compiled the same way makes
    the lr a dynamic input after one recompilation, and so does safeopt's step now, bit-identical
    to it at every step, past dynamo's recompile limit too. Before the fix safeopt's step compiled
    again for every lr (dynamo's record of a float to specialize, made in the frame before the
    compiled step's graph break, leaked into it), and past the limit (8) ran eagerly: not torch's
    compiled bits."""
    params, ref_params = two_by_two_and_a_vector(), two_by_two_and_a_vector()
    kwargs: dict[str, Any] = {"lr": 0.1, "weight_decay": 0.1, "foreach": False}
    opt: Any = (
        safeopt.AdamW(params, **kwargs)
        if make == "twin"
        else safeopt.wrap(torch.optim.AdamW(params, **kwargs))
    )
    ref = torch.optim.AdamW(ref_params, **kwargs)
    schedulers = [torch.optim.lr_scheduler.ExponentialLR(o, 0.9) for o in (opt, ref)]
    counter, ref_counter = CompileCounterWithBackend("aot_eager"), CompileCounterWithBackend("aot_eager")
    step = torch.compile(opt.step, backend=counter)
    ref_step = torch.compile(ref.step, backend=ref_counter)
    gen = torch.Generator().manual_seed(1)
    for i in range(11):
        g0, g1 = torch.randn(2, 2, generator=gen), torch.randn(4, generator=gen)
        idle = i % 2 == 1
        params[0].grad, params[1].grad = g0.clone(), torch.zeros(4) if idle else g1.clone()
        ref_params[0].grad, ref_params[1].grad = g0.clone(), None if idle else g1.clone()
        before = snapshot(opt, params)
        step()
        ref_step()
        for scheduler in schedulers:
            scheduler.step()
        assert bit_equal(params[0].detach(), ref_params[0].detach()), f"step {i}: param 0 differs from torch"
        if idle:
            assert_unchanged(before, opt, params, [1], f"step {i}")
        else:
            assert bit_equal(params[1].detach(), ref_params[1].detach()), (
                f"step {i}: param 1 differs from torch"
            )
    assert counter.frame_count <= ref_counter.frame_count + 1, (
        f"safeopt's step compiled {counter.frame_count} graphs, torch's {ref_counter.frame_count}"
    )


def test_the_seam_gives_the_select_frame_its_own_record_of_floats_to_specialize() -> None:
    """``_torch_compat.enter_select_step_floats`` / ``leave_select_step_floats`` lean on dynamo's
    private ``TensorifyState``: a torch that renames it fails here (the scheduler tests above
    would then fail too). Between them the record is the select frame's own, per optimizer (what
    it recorded the last time, forgotten at ``torch._dynamo.reset()``), after them the other
    frames' record is back as it was."""
    from torch._dynamo import symbolic_convert

    from safeopt._torch_compat import enter_select_step_floats, leave_select_step_floats

    if not hasattr(symbolic_convert, "TensorifyState"):
        pytest.skip(f"torch {torch.__version__} has no TensorifyState: the seam does nothing")
    TensorifyState = symbolic_convert.TensorifyState
    opt, other = (safeopt.AdamW(two_by_two_and_a_vector(), lr=0.1) for _ in range(2))
    torch.compile(lambda x: x + 1, backend="eager")(torch.ones(1))  # as the select frame: one compiled

    TensorifyState.specialize("zf_probe_outer")
    enter_select_step_floats(opt)
    assert not TensorifyState.should_specialize("zf_probe_outer")
    TensorifyState.specialize("zf_probe_select")
    leave_select_step_floats(opt)
    assert TensorifyState.should_specialize("zf_probe_outer")
    assert not TensorifyState.should_specialize("zf_probe_select")
    enter_select_step_floats(other)
    assert not TensorifyState.should_specialize("zf_probe_select")
    leave_select_step_floats(other)
    enter_select_step_floats(opt)
    assert TensorifyState.should_specialize("zf_probe_select")
    assert not TensorifyState.should_specialize("zf_probe_outer")
    leave_select_step_floats(opt)
    torch._dynamo.reset()
    enter_select_step_floats(opt)
    assert not TensorifyState.should_specialize("zf_probe_select")
    leave_select_step_floats(opt)


def test_a_record_kept_before_a_reset_stays_forgotten_however_many_frames_compile_after() -> None:
    """A select frame's record made before ``torch._dynamo.reset()`` names symbols of a compilation
    dynamo has forgotten: it must not come back once as many frames have compiled since the reset
    as before it (it did, when the reset was told by dynamo's frame count: a forloop step of that
    optimizer then compiled again for every lr)."""
    from torch._dynamo import symbolic_convert

    from safeopt._torch_compat import enter_select_step_floats, leave_select_step_floats

    if not hasattr(symbolic_convert, "TensorifyState"):
        pytest.skip(f"torch {torch.__version__} has no TensorifyState: the seam does nothing")
    TensorifyState = symbolic_convert.TensorifyState
    opt = safeopt.AdamW(two_by_two_and_a_vector(), lr=0.1)
    for k in range(3):
        torch.compile(lambda x, k=k: x + k, backend="eager")(torch.ones(1))
    enter_select_step_floats(opt)
    TensorifyState.specialize("zf_stale")
    leave_select_step_floats(opt)
    torch._dynamo.reset()
    for k in range(6):  # more frames than before the reset
        torch.compile(lambda x, k=k: x * k, backend="eager")(torch.ones(1))
    enter_select_step_floats(opt)
    try:
        assert not TensorifyState.should_specialize("zf_stale")
    finally:
        leave_select_step_floats(opt)


@OLD_DYNAMO_LR
def test_an_lr_scheduler_compiles_the_foreach_step_as_often_as_torchs() -> None:
    """Foreach AdamW compiled with a scheduler changing the float lr: torch's class compiles once per
    lr value (after one restart of analysis, which specializes the lr), and safeopt's step too,
    with two graphs more in all, however many values: the frame before its graph break reads the
    lr and restarts once as well, and the select frame, with a record of its own, learns once that
    the lr is specialized (with the other frames' record leaking in it did not, at the cost of the
    forloop step's dynamic lr). Before the fix dynamo's record of floats to specialize was cleared
    at every compiled step, so each recompilation of the step restarted its analysis to learn it
    again (13 graphs over 6 lr values, torch's 7; 17 over 8, torch's 9)."""
    counts = []
    for cls in (torch.optim.AdamW, safeopt.AdamW):
        torch._dynamo.reset()
        params = two_by_two_and_a_vector()
        opt = cls(params, lr=0.05, foreach=True)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)
        counter = CompileCounterWithBackend("aot_eager")
        step = torch.compile(opt.step, backend=counter)
        gen = torch.Generator().manual_seed(1)
        with torch._dynamo.config.patch(cache_size_limit=64):
            for _ in range(8):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                step()
                scheduler.step()
        counts.append(counter.frame_count)
    assert counts[1] <= counts[0] + 2, (
        f"safeopt's foreach step compiled {counts[1]} graphs, torch's {counts[0]}"
    )


def test_a_users_compiled_function_beside_the_compiled_step_compiles_as_with_torchs() -> None:
    """A user's compiled function taking a changing float that dynamo specializes (``clamp(max=s)``),
    called beside a compiled forloop step: it compiles as often beside safeopt's step as beside
    torch's. Before the fix safeopt's step cleared dynamo's record of floats to specialize for every
    frame after it, so each recompilation of the user's function restarted its analysis (11 graphs
    over 6 values, 7 beside torch's step)."""
    counts = []
    for cls in (torch.optim.AdamW, safeopt.AdamW):
        torch._dynamo.reset()
        params = two_by_two_and_a_vector()
        opt = cls(params, lr=0.05, foreach=False)
        step = torch.compile(opt.step, backend="aot_eager")
        counter = CompileCounterWithBackend("aot_eager")
        clamped = torch.compile(lambda x, s: x.clamp(max=s).sum(), backend=counter)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(3, generator=gen)
        with torch._dynamo.config.patch(cache_size_limit=64):
            for i in range(6):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                clamped(x, 0.5 + 0.1 * i)
                step()
        counts.append(counter.frame_count)
    assert counts[1] == counts[0], (
        f"the user's function compiled {counts[1]} graphs, beside torch's step {counts[0]}"
    )


def test_a_forloop_step_after_a_foreach_one_keeps_its_lr_dynamic() -> None:
    """The foreach step's select frame records its lr as a float to specialize; a forloop
    optimizer's select frame compiled after it (after ``torch._dynamo.reset()`` or beside it) does
    not inherit that record (its lr symbol may have the same name): its lr stays a dynamic input,
    as when it runs alone."""
    counts = []
    for foreach in (False, True, False):
        params = two_by_two_and_a_vector()
        opt = safeopt.AdamW(params, lr=0.05, weight_decay=0.1, foreach=foreach)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)
        counter = CompileCounterWithBackend("aot_eager")
        step = torch.compile(opt.step, backend=counter)
        gen = torch.Generator().manual_seed(1)
        with torch._dynamo.config.patch(cache_size_limit=64):
            for _ in range(6):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                step()
                scheduler.step()
        counts.append(counter.frame_count)
        torch._dynamo.reset()
    assert counts[2] == counts[0], f"forloop alone {counts[0]} graphs, after a foreach step {counts[2]}"
