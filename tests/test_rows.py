"""lazy="rows": the rule per row (slice along dim 0) of a parameter of two or more dimensions.

What is checked, after every step:

- grads are never replaced or changed;
- inactive rows: the parameter row and every state row (moments, momentum buffer, row_step)
  bit-identical;
- active rows: torch's update of that row stepped alone (a torch optimizer over a one-row
  parameter, its state being the row's state before the step, with the row's own step count),
  within float rounding (``assert_rounding_close``);
- parameters of fewer than two dimensions, and parameters whose rows were always all active or
  all idle: bit-identical to ``lazy=True``;
- step counts: ``row_step`` per row and torch's ``step`` (steps with any row active);
- state_dict round trips into safeopt and loads into torch.

Also: the row check itself, SparseAdam where its semantics agree, and the errors.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import cases
import harness
import safeopt
from safeopt import _rows
from safeopt._row_rule import active_rows
from safeopt._rows import ROW_STEP

# -- the row check -------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64]


def expected_rows(grad: Tensor) -> list[int]:
    """Rows with an element that compares unequal to zero, written independently of safeopt."""
    return [r for r in range(grad.shape[0]) if harness.expected_active(grad[r].flatten(), frozen=False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_active_rows_finds_exactly_the_rows_with_a_nonzero_element(dtype: torch.dtype) -> None:
    real = dtype.to_real() if dtype.is_complex else dtype
    tiny = torch.finfo(real).smallest_normal / 4
    rows = {
        "+0": [0.0, 0.0, 0.0],
        "-0": [-0.0, -0.0, -0.0],
        "+0 and -0": [0.0, -0.0, 0.0],
        "one": [0.0, 1.0, 0.0],
        "negative only": [-0.0, -2.0, 0.0],
        "subnormal": [0.0, 0.0, tiny],
        "-subnormal and -0": [-0.0, -tiny, -0.0],
        "nan": [0.0, float("nan"), 0.0],
        "inf": [float("inf"), 0.0, 0.0],
        "-inf": [-0.0, 0.0, float("-inf")],
    }
    grad = torch.tensor(list(rows.values()), dtype=dtype)
    # A nonzero element whose largest byte is the sign byte of -0.0 (0x80): rows whose largest
    # byte is 0x80 are the ones the fast check cannot settle.
    odd = torch.zeros(2, 3, dtype=real)
    odd[0, 0] = harness.from_bits(0x80, real)  # a subnormal, bytes 0x80 0x00 ...
    odd[0, 1] = -0.0
    odd[1, 0] = -0.0
    odd[1, 2] = -harness.from_bits(0x80, real)  # bytes 0x80 0x00 ... 0x80
    if dtype.is_complex:
        odd = odd.to(dtype)
    grad = torch.cat([grad, odd, torch.full((1, 3), -0.0, dtype=dtype)])
    assert odd.view(torch.uint8).amax().item() == 0x80  # the fast check cannot settle these rows
    got = active_rows(grad).tolist()
    assert got == expected_rows(grad), (got, list(rows) + ["0x80 byte", "0x80 byte", "-0"])
    assert got == [3, 4, 5, 6, 7, 8, 9, 10, 11]


@pytest.mark.parametrize(
    "make",
    [
        lambda g: g,
        lambda g: g.t().contiguous().t(),  # rows not contiguous
        lambda g: g[:, ::2],  # not even dense
        lambda g: g.reshape(g.shape[0], 2, -1),  # three dimensions
        lambda g: g.reshape(g.shape[0], 2, -1).transpose(1, 2),
        lambda g: g[:0],
        lambda g: g[:, :0],
    ],
    ids=["contiguous", "transposed", "strided", "3-d", "3-d transposed", "no rows", "empty rows"],
)
def test_active_rows_any_layout(make: Any) -> None:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(9, 8, generator=gen)
    base[torch.rand(9, generator=gen) < 0.6] = 0
    base[2] = -0.0
    grad = make(base)
    assert active_rows(grad).tolist() == expected_rows(grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("open_rows", ["none", "few", "many"])
def test_active_rows_wide_rows(dtype: torch.dtype, open_rows: str) -> None:
    """Rows of 1 KB and more are first judged by their first element; the rest are read in full
    (gathered when few, all of the grad when many). Every kind of row, in all three regimes."""
    real = dtype.to_real() if dtype.is_complex else dtype
    width = 2048 // torch.empty((), dtype=real).element_size()  # 2 KB rows
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(16, width, generator=gen, dtype=torch.float64).to(dtype)  # first elements nonzero
    opened = {"none": 0, "few": 5, "many": 12}[open_rows]
    kinds = ["zero", "-0", "zero but last", "-0 but a sign byte", "nan later", "subnormal later"]
    for r in range(opened):
        kind = kinds[r % len(kinds)]
        row = grad[r]
        row.zero_()
        if kind == "-0":
            row.fill_(-0.0)
        elif kind == "zero but last":
            row[-1] = 1.5
        elif kind == "-0 but a sign byte":
            row.fill_(-0.0)
            row[width // 2] = (
                harness.from_bits(0x80, real).to(dtype)
                if not dtype.is_complex
                else complex(harness.from_bits(0x80, real).item(), 0)
            )
        elif kind == "nan later":
            row[3] = float("nan")
        elif kind == "subnormal later":
            row[-2] = torch.finfo(real).smallest_normal / 4
    grad[opened:, 0] = torch.where(grad[opened:, 0] == 0, torch.ones((), dtype=dtype), grad[opened:, 0])
    got = active_rows(grad).tolist()
    assert got == expected_rows(grad)
    assert len(got) == 16 - sum(kinds[r % len(kinds)] in ("zero", "-0") for r in range(opened))


# -- the reference: torch stepping one row alone ------------------------------------------------


def assert_rounding_close(
    actual: Tensor, expected: Tensor, before: Tensor, what: str, nan_either: Tensor | None = None
) -> None:
    """``actual`` equals ``expected`` up to float rounding, elementwise (NaN where it is NaN).

    The row path runs torch's own kernel on compact rows; the reference runs it on one row. A
    kernel may take a different code path at different positions (a vectorised body or a scalar
    tail, the one contracting ``a * b + c`` into an FMA, or rounding an intermediate to bfloat16,
    and the other not): a different rounding of one intermediate, worth at most an ulp of the
    largest value in the update. Every update here is ``new = old + u`` with ``|u| <= |old| +
    |new|``, so the bound ``4 * eps * (|old| + |new|)`` covers that with a margin of 4 (the largest
    difference measured on this project's machines: 1.1). A wrong step count changes a float32
    update by about 10% of ``u``: ``test_the_tolerance_sees_a_wrong_step_count``.

    ``nan_either`` marks elements where torch itself gives NaN at some positions of a tensor and a
    number at others: there ``actual`` may be NaN or torch's number.
    """
    a, e, b = (torch.view_as_real(t) if t.is_complex() else t for t in (actual, expected, before))
    assert a.shape == e.shape, what
    eps = torch.finfo(a.dtype).eps
    a, e, b = a.double(), e.double(), b.double()
    either = torch.zeros_like(a, dtype=torch.bool) if nan_either is None else nan_either.expand_as(a)
    nan_ok = torch.eq(a.isnan(), e.isnan()) | (either & a.isnan())
    assert bool(nan_ok.all()), f"{what}: NaN where torch has none, or the reverse"
    tol = 4 * eps * (b.abs() + e.abs())
    ok = (a == e) | ((a - e).abs() <= tol) | e.isnan() | (either & a.isnan())
    assert bool(ok.all()), (
        f"{what}: {a[~ok].tolist()} != torch's {e[~ok].tolist()} (before {b[~ok].tolist()})"
    )


def step_row_alone(
    torch_cls: type, kwargs: dict[str, Any], row: Tensor, grad: Tensor, state: dict[str, Tensor], count: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """torch's update of one row (``[1, ...]``) with the row's state and its own step count."""
    q = row.clone()
    ref = torch_cls([q], **kwargs)
    sgd = torch_cls is torch.optim.SGD
    if sgd:
        if count > 0 and "momentum_buffer" in state:
            ref.state[q]["momentum_buffer"] = state["momentum_buffer"].clone()
    else:
        ref.state[q].update({k: v.clone() for k, v in state.items() if k != "step"})
        ref.state[q]["step"] = torch.full_like(state["step"], count)
    q.grad = grad.clone()
    ref.step()
    return q, ref.state[q]


# -- the property test -----------------------------------------------------------------------------

# The configurations, and the implementation x dtype pairs left out, live in tests/cases.py.
CONFIGS = cases.row_configs()
IMPLS = cases.ROW_IMPLS
PROPERTY_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.complex64)
# (shape of the base tensor, transposed?): rows of 2-d and 3-d parameters, a transposed one,
# width-1 rows (grouped biases), and what follows the tensor rule (1-d, 0-d) or has no rows.
PARAM_SHAPES = (
    ((5, 3), False),
    ((4, 2, 2), False),
    ((3, 5), True),
    ((6, 1), False),
    ((3,), False),
    ((), False),
    ((0, 3), False),
    ((3, 0), False),
)
ROW_KINDS = ("zero", "negzero", "dense", "dense", "subnormal", "nan")


def _row_grad(shape: tuple[int, ...], dtype: torch.dtype, kinds: list[str], gen: torch.Generator) -> Tensor:
    grad = torch.zeros(shape, dtype=dtype)
    real = dtype.to_real() if dtype.is_complex else dtype
    for r, kind in enumerate(kinds):
        row = grad[r]
        if kind == "negzero":
            row.fill_(-0.0)
        elif kind in ("dense", "nan"):
            row.copy_(torch.randn(row.shape, generator=gen, dtype=torch.float64).to(dtype))
            if kind == "nan" and row.numel():
                row.view(-1)[0] = float("nan")
        elif kind == "subnormal" and row.numel():
            row.view(-1)[-1] = torch.finfo(real).smallest_normal / 4
    return grad


@settings(parent=settings.default)
@given(data=st.data())
def test_rows_property(data: Any) -> None:
    # Both ways of stepping rows: in place (views of the parameter) and gathered.
    with harness.rows_stepped_either_way(data):
        _rows_property(data)


def _rows_property(data: Any) -> None:
    torch_cls, kwargs = data.draw(st.sampled_from(CONFIGS), label="config")
    impl = data.draw(st.sampled_from(sorted(IMPLS)), label="impl")
    dtype = data.draw(st.sampled_from(PROPERTY_DTYPES), label="dtype")
    if cases.rows_unsupported(torch_cls, impl, dtype):
        impl = "forloop"
    kwargs = {"lr": 0.05, **kwargs, **IMPLS[impl]}
    twin = cases.TWINS[torch_cls]
    sgd = torch_cls is torch.optim.SGD
    counted = not sgd or kwargs.get("momentum", 0) != 0  # SGD without momentum keeps no state at all
    recipes = data.draw(st.lists(st.sampled_from(PARAM_SHAPES), min_size=1, max_size=4), label="params")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    gen = torch.Generator().manual_seed(seed)

    def build() -> list[nn.Parameter]:
        g = torch.Generator().manual_seed(seed)
        out = []
        for shape, transposed in recipes:
            value = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
            out.append(nn.Parameter(value.t() if transposed else value))
        return out

    params, twin_params = build(), build()
    opt = twin(params, **kwargs, lazy="rows")
    lazy_opt = twin(twin_params, **kwargs, lazy=True)  # the same run under the tensor rule
    n_rows = [p.shape[0] if p.dim() > 1 else 0 for p in params]
    counts = [[0] * n for n in n_rows]  # the model of the per-row counts
    tensor_steps = [0] * len(params)  # steps with any row active
    uniform = [True] * len(params)  # every step so far: all rows active or none

    for step in range(data.draw(st.integers(1, 6), label="steps")):
        frozen = data.draw(
            st.lists(st.booleans(), min_size=len(params), max_size=len(params)), label="frozen"
        )
        grads: list[Tensor | None] = []
        for p, n in zip(params, n_rows):
            kind = data.draw(st.sampled_from(("none", "rows", "rows", "all dense")), label="grad")
            if kind == "none":
                grads.append(None)
            elif p.dim() < 2 or kind == "all dense":
                grads.append(
                    harness.make_grad(
                        torch.empty(p.shape, dtype=dtype),
                        "dense"
                        if kind == "all dense"
                        else data.draw(st.sampled_from(("zero", "dense")), label="kind"),
                        gen,
                    )
                )
            else:
                kinds = data.draw(
                    st.lists(st.sampled_from(ROW_KINDS), min_size=n, max_size=n), label="row kinds"
                )
                grads.append(_row_grad(tuple(p.shape), dtype, kinds, gen))
        # Grads laid out like their parameters, as autograd makes them: torch 2.13's CPU fused
        # Adam mixes up elements when a grad's strides differ from its parameter's.
        grads = [None if g is None else torch.empty_like(p.detach()).copy_(g) for p, g in zip(params, grads)]
        for i, (p, q) in enumerate(zip(params, twin_params)):
            p.grad, q.grad = grads[i], None if grads[i] is None else grads[i].clone()
            for o, t in ((opt, p), (lazy_opt, q)):
                if frozen[i] != o.is_frozen(t):
                    (o.freeze if frozen[i] else o.unfreeze)(t)
        note(f"step {step}: frozen {frozen}, grads {[None if g is None else g.tolist() for g in grads]}")
        before = harness.snapshot(opt, params)
        opt.step()
        lazy_opt.step()

        what = f"{torch_cls.__name__} {impl} {dtype} step {step}"
        for i, (p, grad) in enumerate(zip(params, grads)):
            assert p.grad is grad and (grad is None or harness.bit_equal(grad, before[i][1])), (
                f"{what}: grad {i}"
            )
            if p.dim() < 2:
                continue
            rows = [] if frozen[i] or grad is None else expected_rows(grad)
            old_value, _, old_state = before[i]
            state = opt.state.get(p, {})
            idle = [r for r in range(n_rows[i]) if r not in rows]
            for r in idle:
                assert harness.bit_equal(p.detach()[r], old_value[r]), (
                    f"{what}: idle row {r} of param {i} moved"
                )
                for key, value in old_state.items():
                    if key == ROW_STEP or (isinstance(value, Tensor) and value.shape == p.shape):
                        assert harness.bit_equal(state[key][r], value[r]), f"{what}: state[{key!r}] row {r}"
            if rows and len(rows) < n_rows[i]:
                uniform[i] = False
            for r in rows:
                row_state = {
                    k: (v[r : r + 1] if v.shape == p.shape else v)
                    for k, v in old_state.items()
                    if isinstance(v, Tensor) and k != ROW_STEP
                }
                if not sgd and "step" not in row_state:  # first step: torch's fresh state
                    row_state = {
                        "step": torch.zeros_like(state["step"]),
                        **{
                            k: torch.zeros_like(v[r : r + 1])
                            for k, v in state.items()
                            if k not in ("step", ROW_STEP)
                        },
                    }
                value, ref_state = step_row_alone(
                    torch_cls, kwargs, old_value[r : r + 1], grad[r : r + 1], row_state, counts[i][r]
                )
                assert_rounding_close(
                    p.detach()[r : r + 1], value, old_value[r : r + 1], f"{what}: param {i} row {r}"
                )
                for key, ref_value in ref_state.items():
                    if key != "step":
                        old = row_state.get(key, torch.zeros_like(ref_value))
                        either = None
                        if key == "max_exp_avg_sq" and impl == "fused":
                            # torch's fused amsgrad max keeps a NaN of exp_avg_sq in its vectorised
                            # body and drops it in its scalar tail: NaN or not depends on position.
                            either = state["exp_avg_sq"][r : r + 1].isnan()
                        assert_rounding_close(
                            state[key][r : r + 1], ref_value, old, f"{what}: param {i} {key} row {r}", either
                        )
                counts[i][r] += 1
            if rows:
                tensor_steps[i] += 1
            if not sgd and state:
                assert float(state["step"]) == tensor_steps[i], f"{what}: param {i} step"
            if ROW_STEP in state:
                assert state[ROW_STEP].dtype == torch.float32 and state[ROW_STEP].shape == (n_rows[i],)
                if sgd:  # SGD keeps no step count: only "started" matters
                    assert (state[ROW_STEP] > 0).tolist() == [c > 0 for c in counts[i]], (
                        f"{what}: row_step {i}"
                    )
                else:
                    assert state[ROW_STEP].tolist() == counts[i], f"{what}: row_step of param {i}"
            elif counted:
                assert uniform[i], f"{what}: param {i} had a partial step but has no row_step"
        for i, (p, q) in enumerate(zip(params, twin_params)):
            if not uniform[i]:
                continue
            # Never a partial step: exactly lazy=True. One exception is torch's: its foreach SGD
            # rounds a float16/bfloat16 tensor differently when another tensor of the same call
            # starts its momentum buffer (test_torch_foreach_sgd_rounds_by_its_company), and the
            # two runs put different company beside it when some other parameter starts as a
            # whole under lazy=True but by rows here. There: within a few ulps a step.
            if (
                sgd
                and impl == "foreach"
                and kwargs.get("momentum")
                and dtype in (torch.float16, torch.bfloat16)
            ):
                _assert_within_ulps(p.detach(), q.detach(), step + 1, f"{what}: param {i} against lazy=True")
                for key, value in opt.state.get(p, {}).items():
                    _assert_within_ulps(value, lazy_opt.state[q][key], step + 1, f"{what}: param {i} {key}")
                continue
            assert harness.bit_equal(p.detach(), q.detach()), f"{what}: param {i} differs from lazy=True"
            harness.assert_state_equal(opt.state.get(p, {}), lazy_opt.state.get(q, {}), f"{what}: param {i}")

        if data.draw(st.booleans(), label="checkpoint"):
            saved = harness.roundtrip(opt.state_dict())
            torch_cls(build(), **kwargs).load_state_dict(saved)  # loads into torch
            opt = twin(params, **kwargs, lazy=True)  # the group's "lazy" comes from the checkpoint
            opt.load_state_dict(saved)
            assert all(g["lazy"] == "rows" for g in opt.param_groups)
            for p in params:
                if ROW_STEP in opt.state.get(p, {}):
                    assert opt.state[p][ROW_STEP].dtype == torch.float32
            lazy_state = harness.roundtrip(lazy_opt.state_dict())
            lazy_opt = twin(twin_params, **kwargs)
            lazy_opt.load_state_dict(lazy_state)


def _assert_within_ulps(actual: Tensor, expected: Tensor, steps: int, what: str) -> None:
    """Elementwise ``|actual - expected| <= 2 * steps * eps * (|actual| + |expected|)``, NaN where NaN."""
    a, e = actual.double(), expected.double()
    eps = torch.finfo(actual.dtype).eps
    assert torch.equal(a.isnan(), e.isnan()), f"{what}: NaN where the other has none"
    ok = (a == e) | ((a - e).abs() <= 2 * steps * eps * (a.abs() + e.abs())) | a.isnan()
    assert bool(ok.all()), f"{what}: {a[~ok].tolist()} != {e[~ok].tolist()}"


def test_torch_foreach_sgd_rounds_by_its_company() -> None:
    """torch's own foreach SGD: a bfloat16 tensor that has a momentum buffer is updated with other
    bits when another tensor of the same call starts its buffer (torch then steps every tensor
    with per-tensor ops instead of foreach ops). This is why gathered rows get a torch call of
    their own, and why test_rows_property compares such runs with lazy=True within a few ulps."""
    differs = 0
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        start, g1, g2, other = (torch.randn(5, 3, generator=gen).to(torch.bfloat16) for _ in range(4))
        results = []
        for company in (False, True):
            a, b = nn.Parameter(start.clone()), nn.Parameter(start.clone())
            opt = torch.optim.SGD(
                [a, b], lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.1, foreach=True
            )
            a.grad = g1.clone()
            opt.step()  # a has a buffer, b none
            a.grad, b.grad = g2.clone(), (other.clone() if company else None)
            opt.step()
            results.append(a.detach().clone())
        differs += not torch.equal(*results)
    assert differs > 0  # if torch stops doing this, the exception in test_rows_property can go


def test_the_tolerance_sees_a_wrong_step_count() -> None:
    """assert_rounding_close fails when a row is stepped with its neighbour's count (one more)."""
    gen = torch.Generator().manual_seed(0)
    row, grad = torch.randn(1, 8, generator=gen), torch.randn(1, 8, generator=gen)
    state = {
        "step": torch.tensor(5.0),
        "exp_avg": torch.randn(1, 8, generator=gen) * 0.1,
        "exp_avg_sq": torch.rand(1, 8, generator=gen) * 0.01,
    }
    right, _ = step_row_alone(torch.optim.Adam, {"lr": 0.05}, row, grad, state, 5)
    wrong, _ = step_row_alone(torch.optim.Adam, {"lr": 0.05}, row, grad, state, 6)
    assert_rounding_close(right, right.clone(), row, "same")
    with pytest.raises(AssertionError, match="!= torch's"):
        assert_rounding_close(wrong, right, row, "off by one")


# -- fixed scenarios ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases.params(twins_only=True, where=lambda c: c.impl != "differentiable"))
def test_every_row_active_is_lazy_true_bit_for_bit(case: cases.Case) -> None:
    """Every optim_db configuration of the twins: with all rows active every step, rows is lazy=True."""
    shapes = [(4, 3), (2, 3, 2), (5,), ()]
    params, ref_params = harness.make_params(shapes), harness.make_params(shapes)
    opt, ref = case.make_safe(params, lazy="rows"), case.make_safe(ref_params, lazy=True)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p, q in zip(params, ref_params):
            p.grad = harness.make_grad(p, "dense", gen)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for i, (p, q) in enumerate(zip(params, ref_params)):
        assert harness.bit_equal(p.detach(), q.detach()), f"{case.id}: param {i}"
        harness.assert_state_equal(opt.state[p], ref.state[q], f"{case.id}: param {i}")


def test_sgd_row_momentum_starts_at_each_rows_first_step() -> None:
    """A row's first active step makes its buffer from its grad, as torch's first step does
    (with dampening, buf = grad, not (1 - dampening) * grad), also when other rows started earlier."""
    w = nn.Parameter(torch.zeros(3, 2))
    opt = safeopt.SGD([w], lr=1.0, momentum=0.5, dampening=0.5, lazy="rows")
    w.grad = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    opt.step()
    w.grad = torch.tensor([[2.0, 2.0], [4.0, 4.0], [0.0, 0.0]])
    opt.step()
    buf = opt.state[w]["momentum_buffer"]
    assert buf.tolist() == [[0.5 * 1 + 0.5 * 2] * 2, [4.0, 4.0], [0.0, 0.0]]
    assert w.tolist() == [[-1.0 - 1.5] * 2, [-4.0, -4.0], [0.0, 0.0]]
    assert opt.state[w][ROW_STEP].tolist() == [2.0, 1.0, 0.0]


def test_adam_rows_get_their_own_bias_correction() -> None:
    """Row 1 joins at step 3: its first update is torch's first Adam step (lr times the sign)."""
    w = nn.Parameter(torch.zeros(2, 1))
    opt = safeopt.Adam([w], lr=0.1, lazy="rows")
    for _ in range(2):
        w.grad = torch.tensor([[1.0], [0.0]])
        opt.step()
    w.grad = torch.tensor([[1.0], [-3.0]])
    opt.step()
    assert w[1].item() == pytest.approx(0.1, rel=1e-6)
    assert opt.state[w]["step"].item() == 3 and opt.state[w][ROW_STEP].tolist() == [3.0, 1.0]


def test_sparse_grads_and_small_params_follow_the_tensor_rule() -> None:
    """1-d and 0-d parameters, and sparse grads (SGD takes them), are decided per tensor."""
    emb, bias = nn.Parameter(torch.ones(4, 2)), nn.Parameter(torch.ones(3))
    opt = safeopt.SGD([emb, bias], lr=0.1, lazy="rows")
    emb.grad = torch.sparse_coo_tensor([[1]], [[1.0, 1.0]], (4, 2), check_invariants=True)
    bias.grad = torch.tensor([0.0, 1.0, 0.0])
    opt.step()
    assert emb[1].tolist() == torch.full((2,), 0.9).tolist() and emb[0].tolist() == [1.0, 1.0]
    assert bias.tolist() == torch.tensor([1.0, 0.9, 1.0]).tolist()  # the whole tensor was active


def test_state_dict_loads_into_torch_and_torch_continues() -> None:
    w = nn.Parameter(torch.randn(4, 3, dtype=torch.bfloat16))
    opt = safeopt.Adam([w], lr=0.1, lazy="rows")
    for rows in ([0], [0, 1], [3]):
        w.grad = torch.zeros_like(w)
        w.grad[rows] = 1
        opt.step()
    saved = harness.roundtrip(opt.state_dict())
    assert saved["state"][0][ROW_STEP].dtype == torch.float32
    q = nn.Parameter(w.detach().clone())
    ref = torch.optim.Adam([q], lr=0.1)
    ref.load_state_dict(saved)
    assert float(ref.state[q]["step"]) == 3  # steps in which any row took part
    q.grad = torch.ones_like(q)
    ref.step()  # torch ignores row_step and steps every row with its own count
    assert float(ref.state[q]["step"]) == 4
    again = safeopt.Adam([w], lr=0.1)
    # A copy of the checkpoint: torch's load shares the saved step tensor, which ref.step() advanced.
    again.load_state_dict(harness.roundtrip(opt.state_dict()))
    assert again.state[w][ROW_STEP].dtype == torch.float32  # torch's load made it bfloat16
    assert again.state[w][ROW_STEP].tolist() == [2.0, 1.0, 0.0, 1.0]


def test_rows_is_refused_through_wrap_and_with_differentiable() -> None:
    w = nn.Parameter(torch.ones(2, 2))
    w.grad = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    # wrap() refuses lazy="rows" when it is made, not at the first step (tests/test_wrap.py has
    # the add_param_group and load_state_dict cases).
    with pytest.raises(ValueError, match='lazy="rows" \\(param group 0\\) is supported by'):
        safeopt.wrap(torch.optim.Adam([w]), lazy="rows")
    with pytest.raises(ValueError, match="use safeopt.Adam"):
        safeopt.wrap(torch.optim.RMSprop([{"params": [w], "lazy": "rows"}]))
    for opt, message in [
        (
            safeopt.SGD([nn.Parameter(torch.ones(2, 2))], lr=0.1, differentiable=True, lazy="rows"),
            "does not support differentiable=True",
        ),
    ]:
        for p in opt.param_groups[0]["params"]:
            p.grad = w.grad
        with pytest.raises(ValueError, match=message):
            opt.step()
        assert w.tolist() == [[1.0, 1.0], [1.0, 1.0]] and not opt.state


def test_invalid_lazy_names_the_choices() -> None:
    with pytest.raises(ValueError, match="Invalid lazy value: 'row'; expected True, False or \"rows\""):
        safeopt.Adam([nn.Parameter(torch.zeros(2, 2))], lazy="row")


# -- SparseAdam, where the semantics agree --------------------------------------------------------


def test_matches_sparse_adam_on_sparse_gradients() -> None:
    """torch.optim.SparseAdam with sparse row gradients (what nn.Embedding(sparse=True) makes)
    against safeopt.Adam(lazy="rows") with the same gradients made dense.

    Both leave rows outside the gradient bit-identical and decay the moments of the rows in it
    alike. SparseAdam counts steps per tensor, so its bias correction agrees for a row when the
    row's count is the tensor's: each row is compared with a SparseAdam over that row alone,
    stepped when the row is in the gradient. SparseAdam adds eps before dividing by
    sqrt(bias_correction2), Adam after; with eps=1e-30 that difference is far below float64
    rounding, and so is the rest (the moments are computed in another order): rtol 1e-12.
    """
    n, width, lr = 6, 4, 0.01
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(n, width, generator=gen, dtype=torch.float64)
    dense = nn.Parameter(start.clone())
    table = nn.Parameter(start.clone())
    alone = [nn.Parameter(start[r : r + 1].clone()) for r in range(n)]
    opt = safeopt.Adam([dense], lr=lr, eps=1e-30, lazy="rows")
    sparse_table = torch.optim.SparseAdam([table], lr=lr, eps=1e-30)
    sparse_alone = [torch.optim.SparseAdam([a], lr=lr, eps=1e-30) for a in alone]
    schedule = [[0, 2], [2, 3], [0, 2, 5], [1], [0, 1, 2, 3, 4, 5], [5, 0]]
    for rows in schedule:
        values = torch.randn(len(rows), width, generator=gen, dtype=torch.float64)
        grad = torch.sparse_coo_tensor([rows], values, (n, width), check_invariants=True)
        dense.grad, table.grad = grad.to_dense(), grad.clone()
        before, table_before = dense.detach().clone(), table.detach().clone()
        opt.step()
        sparse_table.step()
        for r, v in zip(rows, values):
            alone[r].grad = torch.sparse_coo_tensor([[0]], v[None], (1, width), check_invariants=True)
            sparse_alone[r].step()
        idle = [r for r in range(n) if r not in rows]
        assert torch.equal(dense.detach()[idle], before[idle])
        assert torch.equal(table.detach()[idle], table_before[idle])
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                opt.state[dense][key], sparse_table.state[table][key], rtol=1e-12, atol=0
            )
        expected = torch.cat([a.detach() for a in alone])
        torch.testing.assert_close(dense.detach(), expected, rtol=1e-12, atol=0)


# -- AMP and failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("in_place", [False, True], ids=["gathered", "in place"])
@pytest.mark.parametrize("impl", ["forloop", "foreach", "fused"])
def test_grad_scaler_skips_an_inf_step_and_keeps_row_counts(
    impl: str, in_place: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GradScaler with lazy="rows": a step whose grads hold an inf changes nothing (values, state,
    step and row_step); the steps around it are those of the same run without that step."""
    monkeypatch.setattr(_rows, "_RUN_BYTES", 1 if in_place else 2**62)

    def run(with_inf: bool) -> tuple[Tensor, dict[str, Tensor]]:
        w = nn.Parameter(torch.linspace(-1, 1, 12).reshape(4, 3))
        opt = safeopt.Adam([w], lr=0.1, lazy="rows", **IMPLS[impl])
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=1000)
        plan = [([0, 1], False), ([1, 2], True), ([2, 3], False)]
        for rows, inf in plan:
            if inf and not with_inf:
                continue
            loss = (w[rows] * torch.arange(1.0, 4.0)).sum()
            if inf:
                loss = loss * float("inf")
            opt.zero_grad(set_to_none=False)
            scaler.scale(loss).backward()
            if inf:
                before = (w.detach().clone(), {k: v.clone() for k, v in opt.state[w].items()})
            scaler.step(opt)
            scaler.update()
            if inf:
                assert harness.bit_equal(w.detach(), before[0]), impl
                harness.assert_state_equal(opt.state[w], before[1], f"{impl}: state after the inf step")
        return w.detach(), dict(opt.state[w])

    w_skip, state_skip = run(with_inf=True)
    w_ref, state_ref = run(with_inf=False)
    assert harness.bit_equal(w_skip, w_ref), impl
    harness.assert_state_equal(state_skip, state_ref, impl)
    assert state_ref[ROW_STEP].tolist() == [1.0, 1.0, 1.0, 1.0] and float(state_ref["step"]) == 2


@pytest.mark.parametrize("in_place", [False, True], ids=["gathered", "in place"])
def test_a_raising_step_keeps_grads_and_leaves_no_trace(
    in_place: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's step raising (here: a sparse grad that Adam refuses in another param's place)
    leaves every grad the same tensor with the same values, and no gathered rows in the state."""
    monkeypatch.setattr(_rows, "_RUN_BYTES", 1 if in_place else 2**62)
    w = nn.Parameter(torch.ones(4, 2))
    v = nn.Parameter(torch.ones(3))
    opt = safeopt.Adam([w, v], lr=0.1, lazy="rows")
    w.grad = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    opt.step()
    grad_w = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    w.grad = grad_w
    v.grad = torch.sparse_coo_tensor([[0]], [1.0], (3,), check_invariants=True)
    saved_w, saved_state = w.detach().clone(), {k: t.clone() for k, t in opt.state[w].items()}
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert w.grad is grad_w and grad_w.tolist() == [[0.0, 0.0], [3.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    assert set(opt.state) <= {w, v}, "gathered rows left in the optimizer state"
    assert harness.bit_equal(w.detach(), saved_w)
    harness.assert_state_equal(opt.state[w], saved_state, "w after the failed step")
