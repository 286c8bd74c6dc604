"""GradScaler steps that the fused kernels skip, and row counts that pass through torch.

A step GradScaler skips (a grad holds inf or NaN) changes nothing: not the parameters, not their
state, not ``row_step``. In particular a parameter (``lazy=True``) or a row (``lazy="rows"``)
whose first active step is a skipped one is not "started" by it: its next real step is torch's
first step for it. The expected value is therefore the same run with the skipped steps left out:
for ``lazy=True`` that is torch's class stepping only the active parameters in the steps that
were not skipped, with the same scaled grads and scale; for ``lazy="rows"`` it is safeopt over
the same schedule without the skipped steps (whose steps ``tests/test_rows.py`` checks against
torch row by row). The property test draws which steps overflow and puts the first active step
of a parameter or row on an overflowing step half of the time.

Row counts through torch (``docs/rows.md``): torch's ``load_state_dict`` casts ``row_step`` to
the parameter's dtype, and torch's optimizers do not count rows.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st
from torch import Tensor, nn

import harness
import safeopt
from safeopt import _rows, _rule
from safeopt._rows import ROW_STEP, ROW_STEP_AT
from test_capturable import capturing, host_reads

INF = float("inf")


def scaler(scale: float = 4.0) -> torch.amp.GradScaler:
    sc = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
    sc.scale(torch.tensor(1.0))  # makes the scale tensor, as a first scale(loss) does
    return sc


def manual_step(opt: torch.optim.Optimizer, scale: float, step: Callable[[], Any] | None = None) -> None:
    """What GradScaler does around a fused optimizer's step that found no inf."""
    opt.grad_scale = torch.tensor(scale)  # type: ignore[attr-defined]  # GradScaler's attribute
    opt.found_inf = torch.tensor(0.0)  # type: ignore[attr-defined]  # GradScaler's attribute
    try:
        (step or opt.step)()
    finally:
        del opt.grad_scale, opt.found_inf  # type: ignore[attr-defined]  # GradScaler's attribute


FRESH_KEYS = {
    torch.optim.SGD: set(),
    torch.optim.Adam: {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
    torch.optim.AdamW: {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
}


def torch_class(opt: torch.optim.Optimizer) -> type:
    inner = getattr(opt, "optimizer", opt)
    return next(c for c in (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD) if isinstance(inner, c))


def assert_like(mine: dict[str, Any], expected: dict[str, Any], p: Tensor, cls: type, what: str) -> None:
    """``mine`` is ``expected`` bit for bit; where nothing was expected (the parameter never
    stepped), only torch's fresh allocation may be there: no momentum buffer, no ``row_step``."""
    if expected:
        harness.assert_state_equal(mine, expected, what)
        return
    extra = set(mine) - FRESH_KEYS[cls]
    assert not extra, f"{what}: a parameter that never stepped holds {sorted(extra)}"
    harness.assert_fresh(mine, p, what)


# -- the reproducer -------------------------------------------------------------------------

MAKERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "SGD": lambda ps, **kw: safeopt.SGD(ps, **kw),
    "wrap-SGD": lambda ps, **kw: safeopt.wrap(torch.optim.SGD(ps, **kw)),
}


DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", MAKERS)
def test_fused_sgd_first_step_in_a_skipped_step_starts_no_buffer(make: str, device: str) -> None:
    """Issue 25.2: b's first nonzero grad comes in a step GradScaler skips. torch's fused SGD
    starts its buffer with empty_like and the skipped kernel never fills it; b must not count as
    started, and its next real step is torch's first: b = 1 - 0.1 * 1."""
    a, b = nn.Parameter(torch.ones(3, device=device)), nn.Parameter(torch.ones(3, device=device))
    opt = MAKERS[make]([a, b], lr=0.1, momentum=0.9, fused=True)
    sc = torch.amp.GradScaler(device, init_scale=4.0, growth_interval=1000)
    sc.scale(torch.tensor(1.0, device=device))
    plan = [([1.0] * 3, [0.0] * 3, False), ([1.0] * 3, [1.0, INF, 1.0], True), ([1.0] * 3, [1.0] * 3, False)]
    for ga, gb, skipped in plan:
        scale = sc.get_scale()
        a.grad, b.grad = torch.tensor(ga, device=device) * scale, torch.tensor(gb, device=device) * scale
        before = harness.snapshot(opt, [a, b])
        sc.step(opt)
        sc.update()
        if skipped:
            harness.assert_unchanged(before, opt, [a, b], [0], "a, skipped step")
            assert harness.bit_equal(b.detach(), before[1][0])
            assert "momentum_buffer" not in opt.state.get(b, {}), "a skipped step started b's buffer"
    assert harness.bit_equal(b.detach(), torch.full((3,), 1 - 0.1 * 1.0, device=device))
    assert harness.bit_equal(opt.state[b]["momentum_buffer"], torch.ones(3, device=device))


@pytest.mark.parametrize("in_place", [False, True], ids=["gathered", "in place"])
@pytest.mark.parametrize("dampening", [0.0, 0.5])
def test_fused_sgd_rows_first_step_in_a_skipped_step(
    in_place: bool, dampening: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 25.2 for rows: rows taking their first step in a skipped step start nothing (their
    buffer rows stay zero, ``row_step`` stays), and a parameter whose first rows step there gets
    no ``row_step`` and no buffer."""
    monkeypatch.setattr(_rows, "_RUN_BYTES", 1 if in_place else 2**62)
    plan = [  # (active rows of w, the row holding an inf, or None)
        ([0, 1], 1),  # w's first rows: a skipped step
        ([0], None),
        ([1, 2], 2),  # row 1 started, row 2's first step skipped
        ([2, 3], None),
    ]

    def run(with_inf: bool) -> tuple[Tensor, dict[str, Tensor]]:
        w = nn.Parameter(torch.linspace(-1, 1, 12).reshape(4, 3))
        opt = safeopt.SGD([w], lr=0.1, momentum=0.9, dampening=dampening, fused=True, lazy="rows")
        sc = scaler(4.0)
        for rows, inf_row in plan:
            if inf_row is not None and not with_inf:
                continue
            scale = sc.get_scale()
            grad = torch.zeros(4, 3)
            grad[rows] = torch.arange(1.0, 4.0) * scale
            if inf_row is not None:
                grad[inf_row, 1] = INF
            w.grad = grad
            before = harness.snapshot(opt, [w])
            sc.step(opt)
            sc.update()
            if inf_row is not None:
                assert harness.bit_equal(w.detach(), before[0][0])
                harness.assert_state_equal(dict(opt.state.get(w, {})), before[0][2], "after the skipped step")
        return w.detach(), dict(opt.state[w])

    w_skip, state_skip = run(with_inf=True)
    w_ref, state_ref = run(with_inf=False)
    assert harness.bit_equal(w_skip, w_ref)
    harness.assert_state_equal(state_skip, state_ref, "the run with skipped steps")


# -- the property: skipped steps change nothing, wherever first steps land ---------------------------

TWINS: dict[str, tuple[type, Callable[..., torch.optim.Optimizer]]] = {
    "SGD": (torch.optim.SGD, lambda ps, **kw: safeopt.SGD(ps, **kw)),
    "Adam": (torch.optim.Adam, lambda ps, **kw: safeopt.Adam(ps, **kw)),
    "AdamW": (torch.optim.AdamW, lambda ps, **kw: safeopt.AdamW(ps, **kw)),
    "wrap-SGD": (torch.optim.SGD, lambda ps, **kw: safeopt.wrap(torch.optim.SGD(ps, **kw))),
    "wrap-Adam": (torch.optim.Adam, lambda ps, **kw: safeopt.wrap(torch.optim.Adam(ps, **kw))),
}


@st.composite
def options(draw: Any, name: str) -> dict[str, Any]:
    cls = TWINS[name][0]
    kwargs: dict[str, Any] = {"fused": True, "weight_decay": draw(st.sampled_from([0.0, 0.01]))}
    if cls is torch.optim.SGD:
        nesterov = draw(st.booleans())
        kwargs.update(lr=0.1, momentum=draw(st.sampled_from([0.9, 0.0]) if not nesterov else st.just(0.9)))
        kwargs.update(nesterov=nesterov, dampening=0.0 if nesterov else draw(st.sampled_from([0.0, 0.5])))
    else:
        kwargs.update(lr=0.05, amsgrad=draw(st.booleans()), capturable=draw(st.booleans()))
    return kwargs


@st.composite
def schedules(draw: Any, units: int, steps: int) -> tuple[list[list[str]], list[int | None]]:
    """Per step, a grad kind per unit (a parameter or a row): "none", "zero" or "dense"; and per
    step the unit holding an inf, or None. Each unit's first active step is drawn, and half of
    the time it is a step that overflows, its inf in that unit."""
    kinds = [[draw(st.sampled_from(["none", "zero", "dense"])) for _ in range(units)] for _ in range(steps)]
    overflow: list[int | None] = [
        draw(st.sampled_from(range(units))) if draw(st.integers(0, 4)) == 0 else None for _ in range(steps)
    ]
    for unit in range(units):
        first = draw(st.integers(0, steps - 1), label=f"first active step of unit {unit}")
        for step in range(first):
            if kinds[step][unit] == "dense":
                kinds[step][unit] = "zero"
            if overflow[step] == unit:
                overflow[step] = None
        kinds[first][unit] = "dense"
        if draw(st.booleans(), label=f"unit {unit} starts in a skipped step"):
            overflow[first] = unit
    return kinds, overflow


def _grad(p: Tensor, kind: str, inf: bool, scale: float, gen: torch.Generator) -> Tensor | None:
    if kind == "none" and not inf:
        return None
    g = torch.zeros_like(p) if kind == "zero" else torch.randint(1, 4, p.shape, generator=gen).to(p.dtype)
    g = g * scale
    if inf:
        g.view(-1)[0] = INF
    return g


@given(data=st.data())
def test_skipped_steps_change_nothing_for_parameters(data: Any) -> None:
    """lazy=True, fused (and capturable) Adam, AdamW, SGD, twin and wrap(): after every step, every
    parameter and its state equal torch's class stepping the active parameters of the steps that
    were not skipped (same scaled grads, same scale)."""
    name = data.draw(st.sampled_from(sorted(TWINS)), label="optimizer")
    torch_cls, make = TWINS[name]
    kwargs = data.draw(options(name), label="options")
    shapes = [(3,), (2, 3), (4,)]
    steps = data.draw(st.integers(2, 6), label="steps")
    kinds, overflow = data.draw(schedules(len(shapes), steps), label="schedule")
    params = harness.make_params(shapes)
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    opt, ref = make(params, **kwargs), torch_cls(ref_params, **kwargs)
    sc = scaler(2.0**4)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    for step in range(steps):
        scale = sc.get_scale()
        grads = [_grad(p, kinds[step][i], overflow[step] == i, scale, gen) for i, p in enumerate(params)]
        if all(g is None for g in grads):
            continue  # GradScaler refuses a step with no grad at all
        note(f"step {step}: {kinds[step]}, inf in {overflow[step]}, scale {scale}")
        for p, g in zip(params, grads):
            p.grad = g
        ref_grads = [None if g is None else g.clone() for g in grads]  # the kernel unscales grads in place
        before = harness.snapshot(opt, params)
        sc.step(opt)
        sc.update()
        if overflow[step] is not None:
            for i, p in enumerate(params):
                assert harness.bit_equal(p.detach(), before[i][0]), f"step {step}: param {i} moved"
                assert_like(dict(opt.state.get(p, {})), before[i][2], p, torch_cls, f"step {step}, param {i}")
            continue
        active = [harness.expected_active(g, frozen=False) for g in grads]
        manual_step(ref, scale, functools.partial(harness.reference_step, ref, ref_params, ref_grads, active))
        for i, (p, q) in enumerate(zip(params, ref_params)):
            assert harness.bit_equal(p.detach(), q.detach()), f"step {step}: param {i} differs from torch"
            mine, expected = dict(opt.state.get(p, {})), dict(ref.state.get(q, {}))
            assert_like(mine, expected, p, torch_cls, f"step {step}, param {i}")


ROW_TWINS = {name: value for name, value in TWINS.items() if not name.startswith("wrap")}


@given(data=st.data())
def test_skipped_steps_change_nothing_for_rows(data: Any) -> None:
    """lazy="rows", fused Adam, AdamW and SGD, rows in place and gathered: after every step the run
    equals the same run without its skipped steps, bit for bit (row_step included), and a
    skipped step changes nothing."""
    with harness.rows_stepped_either_way(data):
        name = data.draw(st.sampled_from(sorted(ROW_TWINS)), label="optimizer")
        torch_cls, make = ROW_TWINS[name]
        kwargs = {**data.draw(options(name), label="options"), "capturable": False, "lazy": "rows"}
        if torch_cls is torch.optim.SGD:
            del kwargs["capturable"]
        rows = 4
        steps = data.draw(st.integers(2, 6), label="steps")
        kinds, overflow = data.draw(schedules(rows + 1, steps), label="schedule")  # rows of w, then b
        seed = data.draw(st.integers(0, 2**16), label="seed")

        scales: dict[int, float] = {}  # the scale of each step in the run with the skipped steps

        def run(with_inf: bool) -> list[tuple[Tensor, Tensor, dict[str, Any], dict[str, Any]]]:
            w, b = nn.Parameter(torch.linspace(-1, 1, rows * 3).reshape(rows, 3)), nn.Parameter(torch.ones(2))
            opt = make([w, b], **kwargs)
            sc = scaler(2.0**4)
            out = []
            for step in range(steps):
                skipped = overflow[step] is not None
                if skipped and not with_inf:
                    continue
                gen = torch.Generator().manual_seed(seed + step)  # the same grads in both runs
                scale = scales.setdefault(step, sc.get_scale())
                row_grads = [
                    _grad(w[0], kinds[step][r], overflow[step] == r, scale, gen) for r in range(rows)
                ]
                gw = (
                    None
                    if all(g is None for g in row_grads)
                    else torch.stack([torch.zeros(3) if g is None else g for g in row_grads])
                )
                gb = _grad(b, kinds[step][rows], overflow[step] == rows, scale, gen)
                if gw is None and gb is None:
                    continue
                w.grad, b.grad = gw, gb
                before = harness.snapshot(opt, [w, b])
                if with_inf:
                    sc.step(opt)
                    sc.update()
                else:
                    manual_step(opt, scale)
                if skipped:
                    for i, p in enumerate([w, b]):
                        assert harness.bit_equal(p.detach(), before[i][0]), f"step {step}: param {i} moved"
                        assert_like(
                            dict(opt.state.get(p, {})), before[i][2], p, torch_cls, f"step {step}, {i}"
                        )
                else:
                    out.append(
                        (
                            w.detach().clone(),
                            b.detach().clone(),
                            *(dict(harness.clone_state(opt.state.get(p, {}))) for p in (w, b)),
                        )
                    )
            return out

        with_skips, without = run(True), run(False)
        assert len(with_skips) == len(without)
        for k, (got, expected) in enumerate(zip(with_skips, without)):
            note(f"compared step {k}")
            assert harness.bit_equal(got[0], expected[0]) and harness.bit_equal(got[1], expected[1])
            for i, p in enumerate((got[0], got[1])):
                assert_like(got[2 + i], expected[2 + i], p, torch_cls, f"step {k}, param {i}")


# -- the capturable step: decided on the device, nothing read -------------------------------------------


def test_capturable_adam_first_step_in_a_skipped_step_reads_nothing() -> None:
    """Fused capturable Adam allocates zeros and takes the skipped step's count back on the device:
    a parameter first active in a skipped step holds torch's fresh state, and the step reads
    nothing on the host."""
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = safeopt.Adam([a, b], lr=0.1, fused=True, capturable=True)
    a.grad, b.grad = torch.ones(3), torch.zeros(3)
    opt.step()
    a.grad, b.grad = torch.ones(3), torch.tensor([1.0, INF, 1.0])
    before = harness.snapshot(opt, [a, b])
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)  # type: ignore[attr-defined]  # GradScaler's attributes
    with host_reads() as seen:
        opt.step()
    assert seen == []
    harness.assert_unchanged(before, opt, [a, b], [0], "skipped")
    assert harness.bit_equal(b.detach(), before[1][0])
    assert_like(dict(opt.state[b]), {}, b, torch.optim.Adam, "b after a skipped first step")


def test_under_capture_a_skipped_step_reads_nothing_and_an_unstarted_buffer_is_refused() -> None:
    """The capturable path (CPU stand-in for a capturing stream): fused SGD whose stepped buffers
    are started takes GradScaler's found_inf on the device (a skipped step changes nothing, nothing
    is read on the host); a parameter whose buffer a step would start is refused before
    anything changes, found_inf or not."""
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = safeopt.SGD([a, b], lr=0.1, momentum=0.9, fused=True)
    a.grad, b.grad = torch.ones(3), torch.zeros(3)
    opt.step()  # a started; b idle, not started
    a.grad, b.grad = torch.tensor([1.0, INF, 1.0]), None  # a grad of b's would need its buffer (below)
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)  # type: ignore[attr-defined]  # GradScaler's attributes
    before = harness.snapshot(opt, [a, b])
    with capturing(), host_reads() as seen:
        opt.step()
    assert seen == []
    harness.assert_unchanged(before, opt, [a, b], [1], "idle")
    assert harness.bit_equal(a.detach(), before[0][0])
    harness.assert_state_equal(dict(opt.state[a]), before[0][2], "a after a skipped step")
    b.grad = torch.ones(3)
    before = harness.snapshot(opt, [a, b])
    with capturing(), pytest.raises(RuntimeError, match="no momentum buffer yet"):
        opt.step()
    harness.assert_unchanged(before, opt, [a, b], [0, 1], "refused")


def test_the_host_read_comes_only_with_a_fresh_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager fused SGD under GradScaler, grads decided as on an accelerator (one read a step):
    found_inf is read on the host in a step that starts a momentum buffer, and in no other."""
    monkeypatch.setattr(_rule, "FORCE_DEVICE", True)
    monkeypatch.setattr(_rule, "DEVICE_PROBE", False)
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = safeopt.SGD([a, b], lr=0.1, momentum=0.9, fused=True)
    reads = []
    for gb in ([0.0] * 3, [1.0] * 3, [2.0] * 3):
        a.grad, b.grad = torch.ones(3), torch.tensor(gb)
        opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(0.0)  # type: ignore[attr-defined]  # GradScaler's attributes
        with host_reads() as seen:
            opt.step()
        reads.append(seen)
    decide = ["Tensor.tolist"]
    read = "aten._local_scalar_dense.default"  # found_inf
    assert reads == [[*decide, read], [*decide, read], decide], reads


# -- row counts through torch (issue 25.4) --------------------------------------------------------------


def _rows_state(opt: torch.optim.Optimizer, w: Tensor, counts: list[float], step: float) -> None:
    """Give ``w`` Adam state with these row counts, as that many row steps would have."""
    opt.state[w] = {
        "step": torch.tensor(step),
        "exp_avg": torch.full_like(w, 0.01),
        "exp_avg_sq": torch.full_like(w, 0.001),
        ROW_STEP: torch.tensor(counts),
    }


def test_row_counts_rounded_by_torchs_load_are_warned_about() -> None:
    """A bfloat16 parameter's row_step 301 comes back from torch.optim.Adam's state_dict as 300:
    the counts cannot be recovered, so the load says so, naming the dtype and the limit."""
    w = nn.Parameter(torch.ones(3, 2, dtype=torch.bfloat16))
    opt = safeopt.Adam([w], lr=0.1, lazy="rows")
    _rows_state(opt, w, [301.0, 5.0, 0.0], 301.0)
    theirs = torch.optim.Adam([nn.Parameter(w.detach().clone())], lr=0.1)
    theirs.load_state_dict(harness.roundtrip(opt.state_dict()))
    back = harness.roundtrip(theirs.state_dict())
    assert back["state"][0][ROW_STEP].tolist() == [300.0, 5.0, 0.0], "torch no longer rounds row_step"
    again = safeopt.Adam([w], lr=0.1, lazy="rows")
    with pytest.warns(UserWarning, match=r"row_step .* saved as torch.bfloat16 .* counts above 256"):
        again.load_state_dict(back)
    assert again.state[w][ROW_STEP].dtype == torch.float32
    # Counts torch could hold, and safeopt's own round trip, load without a word.
    _rows_state(opt, w, [256.0, 5.0, 0.0], 256.0)
    theirs.load_state_dict(harness.roundtrip(opt.state_dict()))
    for saved in (theirs.state_dict(), opt.state_dict()):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            safeopt.Adam([w], lr=0.1, lazy="rows").load_state_dict(harness.roundtrip(saved))


@pytest.mark.parametrize("torch_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_rows_that_torch_stepped_between_runs_count_those_steps(torch_cls: type) -> None:
    """safeopt rows -> torch (3 whole steps) -> safeopt: every row took part in torch's 3 steps,
    so every count is 3 more (the issue: they came back unchanged, and the next update of such a
    row was too large); the next row step then equals the row stepped alone with that count."""
    make = {torch.optim.Adam: safeopt.Adam, torch.optim.AdamW: safeopt.AdamW}[torch_cls]
    w = nn.Parameter(torch.linspace(-1, 1, 12).reshape(4, 3))
    opt = make([w], lr=0.1, lazy="rows")
    for rows in ([0, 1], [1], [1, 2]):
        w.grad = torch.zeros(4, 3)
        w.grad[rows] = 1.0
        opt.step()
    assert opt.state[w][ROW_STEP].tolist() == [1.0, 3.0, 1.0, 0.0]
    assert ROW_STEP_AT not in opt.state[w]
    saved = harness.roundtrip(opt.state_dict())
    assert saved["state"][0].get(ROW_STEP_AT) in (None, 3.0)  # the stamp, if any: step when saved
    q = nn.Parameter(w.detach().clone())
    theirs = torch_cls([q], lr=0.1)
    theirs.load_state_dict(saved)
    for _ in range(3):
        q.grad = torch.full((4, 3), 0.5)
        theirs.step()
    again = make([w], lr=0.1, lazy="rows")
    with torch.no_grad():
        w.copy_(q)
    again.load_state_dict(harness.roundtrip(theirs.state_dict()))
    assert again.state[w][ROW_STEP].tolist() == [4.0, 6.0, 4.0, 3.0]
    assert float(again.state[w]["step"]) == 6 and ROW_STEP_AT not in again.state[w]
    # The next step of row 3 is torch's step of that row alone, at its count (3 -> 4).
    row = nn.Parameter(w.detach()[3:4].clone())
    alone = torch_cls([row], lr=0.1)
    alone.state[row] = {
        "step": torch.tensor(3.0),
        **{k: again.state[w][k][3:4].clone() for k in ("exp_avg", "exp_avg_sq")},
    }
    row.grad = torch.ones(1, 3)
    alone.step()
    w.grad = torch.zeros(4, 3)
    w.grad[3] = 1.0
    again.step()
    torch.testing.assert_close(w.detach()[3:4], row.detach(), rtol=0, atol=1e-7)
    assert again.state[w][ROW_STEP].tolist() == [4.0, 6.0, 4.0, 4.0]
    # A round trip through safeopt alone changes no count.
    once_more = make([w], lr=0.1, lazy="rows")
    once_more.load_state_dict(harness.roundtrip(again.state_dict()))
    assert harness.bit_equal(once_more.state[w][ROW_STEP], again.state[w][ROW_STEP])


def test_sgd_rows_that_torch_started_between_runs_count_as_started() -> None:
    """SGD keeps no step: a row not started under safeopt (count 0, a zero buffer row) whose
    buffer row a torch step made nonzero counts as started after the load."""
    w = nn.Parameter(torch.ones(3, 2))
    opt = safeopt.SGD([w], lr=0.1, momentum=0.9, lazy="rows")
    w.grad = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    opt.step()
    assert opt.state[w][ROW_STEP].tolist() == [1.0, 0.0, 0.0]
    q = nn.Parameter(w.detach().clone())
    theirs = torch.optim.SGD([q], lr=0.1, momentum=0.9)
    theirs.load_state_dict(harness.roundtrip(opt.state_dict()))
    q.grad = torch.tensor([[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]])
    theirs.step()
    again = safeopt.SGD([w], lr=0.1, momentum=0.9, lazy="rows")
    again.load_state_dict(harness.roundtrip(theirs.state_dict()))
    assert again.state[w][ROW_STEP].tolist() == [1.0, 1.0, 0.0]
