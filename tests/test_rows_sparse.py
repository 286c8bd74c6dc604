"""lazy="rows" with sparse COO grads (``nn.Embedding(sparse=True)``, ``nn.EmbeddingBag(sparse=True)``).

The oracle is exact: a safeopt step with a sparse grad is bit-identical to the same safeopt step
with the grad densified as ``grad.coalesce().to_dense()`` (duplicates summed once, in
``coalesce()``'s order), params and every state tensor, ``row_step`` included. What is checked:

- the property, over configurations, implementations, dtypes, shapes (hybrid and fully sparse),
  index patterns (empty, every row, repeats, entries that cancel, -0.0, NaN), frozen params,
  dense steps between sparse ones, and checkpoints;
- every optim_db configuration of the twins, through ``nn.Embedding``/``EmbeddingBag``;
- the cost: after the first steps, a step reads and writes only the rows the grad names (no
  operator allocates or reads a tensor the size of the table except to gather or scatter rows);
- grads are never changed, also when the step raises; a failed step leaves no state behind;
- state_dict checkpoints, and torch continuing from them;
- groups without ``lazy="rows"`` keep the tensor rule (SGD steps the sparse grad, Adam raises).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import cases
import harness
import safeopt
from safeopt import _rows
from safeopt._rows import ROW_STEP

# The configurations, implementations and dtypes of the row-lazy tests (tests/cases.py).
IMPLS = cases.ROW_IMPLS
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64)
# Table shapes: embeddings, 3-d rows, width-1 and width-0 rows, one row.
SHAPES = ((6, 3), (4, 2, 2), (5, 1), (3, 0), (1, 4), (8, 2))
PATTERNS = ("empty", "all rows", "some rows", "repeats", "cancel", "none", "dense")


def sparse_equal(a: Tensor, b: Tensor) -> bool:
    """The same sparse tensor, bit for bit (indices, values, coalesced flag)."""
    return (
        a.layout is b.layout is torch.sparse_coo
        and a.shape == b.shape
        and a.is_coalesced() == b.is_coalesced()
        and torch.equal(a._indices(), b._indices())
        and harness.bit_equal(a._values(), b._values())
    )


def densify(grad: Tensor | None) -> Tensor | None:
    """The oracle's grad."""
    if grad is None or grad.layout is torch.strided:
        return None if grad is None else grad.clone()
    return grad.coalesce().to_dense()


def random_values(n: int, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    values = torch.randn((n, *shape), generator=gen, dtype=torch.float64)
    if dtype.is_complex:
        values = torch.complex(values, torch.randn((n, *shape), generator=gen, dtype=torch.float64))
    return values.to(dtype)


def make_sparse(
    shape: tuple[int, ...], dtype: torch.dtype, pattern: str, full: bool, gen: torch.Generator, data: Any
) -> Tensor:
    """A sparse COO grad for a table of ``shape``. ``full``: every dimension sparse (values are
    scalars), else only dim 0 (values are rows, as nn.Embedding makes them)."""
    n = shape[0]
    if pattern == "empty":
        rows: list[int] = []
    elif pattern == "all rows":
        rows = torch.randperm(n, generator=gen).tolist()
    elif pattern == "repeats":  # coalesce() and plain to_dense() sum these in different orders
        few = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=3), label="repeated rows")
        rows = [few[i % len(few)] for i in range(data.draw(st.integers(2, 48), label="entries"))]
    else:
        rows = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=2 * n), label="rows")
    tail = shape[1:]
    if full:
        width = int(torch.tensor(tail).prod()) if tail else 1
        entries = [(r, e) for r in rows for e in range(width) if torch.rand((), generator=gen) < 0.7]
        index = torch.tensor([[r for r, _ in entries]], dtype=torch.long).reshape(1, -1)
        rest = (
            torch.tensor(
                [list(divmod(e, tail[-1])) if len(tail) == 2 else [e] for _, e in entries], dtype=torch.long
            )
            .reshape(-1, len(tail))
            .t()
        )
        indices = torch.cat([index, rest]) if tail else index
        values = random_values(len(entries), (), dtype, gen)
    else:
        indices = torch.tensor([rows], dtype=torch.long).reshape(1, -1)
        values = random_values(len(rows), tail, dtype, gen)
    if pattern == "cancel" and values.shape[0]:
        # the same entries again with opposite values: the rows sum to zero and stay idle
        indices, values = torch.cat([indices, indices], 1), torch.cat([values, -values])
    if values.numel() and data.draw(st.booleans(), label="odd values"):
        flat = values.reshape(-1)
        flat[0] = -0.0  # +0.0 in the densified grad
        if flat.numel() > 1:
            flat[-1] = data.draw(st.sampled_from([0.0, float("nan"), float("inf"), 1e-40]), label="odd value")
    grad = torch.sparse_coo_tensor(indices, values, shape, check_invariants=True)
    return grad.coalesce() if data.draw(st.booleans(), label="coalesced") else grad


@settings(parent=settings.default)
@given(data=st.data())
def test_sparse_rows_are_the_densified_step_bit_for_bit(data: Any) -> None:
    # Both ways of stepping rows: in place (views of the parameter) and gathered.
    with harness.rows_stepped_either_way(data):
        _sparse_property(data)


def _sparse_property(data: Any) -> None:
    torch_cls, kwargs = data.draw(st.sampled_from(cases.row_configs()), label="config")
    impl = data.draw(st.sampled_from(sorted(IMPLS)), label="impl")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    if cases.rows_unsupported(torch_cls, impl, dtype):
        impl = "forloop"
    kwargs = {"lr": 0.05, **kwargs, **IMPLS[impl]}
    twin = cases.TWINS[torch_cls]
    shapes = data.draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3), label="tables")
    with_bias = data.draw(st.booleans(), label="a 1-d parameter beside them")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    gen = torch.Generator().manual_seed(seed)

    def build() -> list[nn.Parameter]:
        g = torch.Generator().manual_seed(seed)
        out = [nn.Parameter(random_values(s[0], s[1:], dtype, g)) for s in shapes]
        if with_bias:
            out.append(nn.Parameter(random_values(3, (), dtype, g)))
        return out

    params, ref_params = build(), build()
    opt, ref = twin(params, **kwargs, lazy="rows"), twin(ref_params, **kwargs, lazy="rows")
    for step in range(data.draw(st.integers(1, 5), label="steps")):
        grads: list[Tensor | None] = []
        for p in params:
            if p.dim() < 2:
                grads.append(random_values(3, (), dtype, gen))
                continue
            pattern = data.draw(st.sampled_from(PATTERNS), label="pattern")
            if pattern == "none":
                grads.append(None)
            elif pattern == "dense":  # a dense step on the same table
                grads.append(random_values(p.shape[0], tuple(p.shape[1:]), dtype, gen))
            else:
                full = data.draw(st.booleans(), label="every dimension sparse")
                grads.append(make_sparse(tuple(p.shape), dtype, pattern, full, gen, data))
        frozen = data.draw(
            st.lists(st.booleans(), min_size=len(params), max_size=len(params)), label="frozen"
        )
        for p, q, grad, freeze in zip(params, ref_params, grads, frozen):
            p.grad, q.grad = grad, densify(grad)
            for o, t in ((opt, p), (ref, q)):
                if freeze != o.is_frozen(t):
                    (o.freeze if freeze else o.unfreeze)(t)
        kept = [None if g is None else g.clone() for g in grads]
        note(f"step {step}: frozen {frozen}, grads {grads}")
        opt.step()
        ref.step()

        what = f"{torch_cls.__name__} {kwargs} {dtype} step {step}"
        for i, (p, q, grad, before) in enumerate(zip(params, ref_params, grads, kept)):
            assert p.grad is grad, f"{what}: grad {i} replaced"
            if grad is not None:
                same = sparse_equal(grad, before) if grad.is_sparse else harness.bit_equal(grad, before)
                assert same, f"{what}: grad {i} changed"
            assert harness.bit_equal(p.detach(), q.detach()), (
                f"{what}: param {i} differs from the densified step"
            )
            harness.assert_state_equal(opt.state.get(p, {}), ref.state.get(q, {}), f"{what}: param {i}")
        assert len(opt.state) == len(ref.state), f"{what}: rows left in the state"

        if data.draw(st.booleans(), label="checkpoint"):
            saved = harness.roundtrip(opt.state_dict())
            torch_cls(build(), **kwargs).load_state_dict(saved)  # loads into torch
            opt = twin(params, **kwargs)
            opt.load_state_dict(saved)
            ref_saved = harness.roundtrip(ref.state_dict())
            ref = twin(ref_params, **kwargs)
            ref.load_state_dict(ref_saved)


def test_repeated_rows_are_summed_in_coalesce_order() -> None:
    """A row looked up many times: plain ``to_dense()`` sums its entries in the grad's order,
    ``coalesce()`` in its own. The step follows ``coalesce()`` (the same on every device)."""
    table = nn.Parameter(torch.zeros(3, 4))
    ref = nn.Parameter(torch.zeros(3, 4))
    differs = False
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        rows = torch.randint(0, 3, (40,), generator=gen)
        grad = torch.sparse_coo_tensor(
            rows[None], torch.randn(40, 4, generator=gen), (3, 4), check_invariants=True
        )
        if torch.equal(grad.to_dense(), grad.coalesce().to_dense()):
            continue
        differs = True
        for p in (table, ref):
            p.data.zero_()
        opt, ref_opt = safeopt.SGD([table], lr=1.0, lazy="rows"), safeopt.SGD([ref], lr=1.0, lazy="rows")
        table.grad, ref.grad = grad, grad.coalesce().to_dense()
        opt.step()
        ref_opt.step()
        assert harness.bit_equal(table.detach(), ref.detach())
        assert not torch.equal(table.detach(), -grad.to_dense())
    assert differs, "no seed where the two orders differ: the test shows nothing"


# -- every configuration, through the modules that make sparse grads -----------------------------


def _lookup_runs(case: cases.Case, module: str) -> tuple[nn.Module, torch.optim.Optimizer, list[Tensor]]:
    torch.manual_seed(0)
    if module == "embedding":
        layer: nn.Module = nn.Embedding(40, 3, sparse=True, padding_idx=1)
    else:
        layer = nn.EmbeddingBag(40, 3, sparse=True, mode="sum", padding_idx=1)
    head = nn.Linear(3, 1)
    return (
        layer,
        case.make_safe([{"params": [layer.weight], "lazy": "rows"}, {"params": head.parameters()}]),
        [head],
    )


@pytest.mark.parametrize("module", ["embedding", "embedding_bag"])
@pytest.mark.parametrize(
    "case", [c for c in cases.cases(twins_only=True) if c.impl != "differentiable"], ids=lambda c: c.id
)
def test_every_configuration_through_sparse_lookups(case: cases.Case, module: str) -> None:
    """Every optim_db configuration of the twins: an Embedding/EmbeddingBag(sparse=True) trained
    with lazy="rows" is bit-identical to the same model trained on the densified grads. Batches
    repeat lookups, include padding_idx (whose grad entries are zero), and one looks up every row."""
    table, opt, (head,) = _lookup_runs(case, module)
    ref_table, ref_opt, (ref_head,) = _lookup_runs(case, module)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 40, (6, 5), generator=gen) for _ in range(3)]
    batches.insert(1, torch.arange(40).reshape(8, 5))  # every row
    batches.append(torch.tensor([[1, 1, 1, 2, 2]] * 6))  # padding and one row, many times
    for step, tokens in enumerate(batches):
        for layer, linear, o in ((table, head, opt), (ref_table, ref_head, ref_opt)):
            o.zero_grad()
            out = layer(tokens) if module == "embedding_bag" else layer(tokens).sum(1)
            linear(out).pow(2).mean().backward()
        assert table.weight.grad.is_sparse
        ref_table.weight.grad = densify(ref_table.weight.grad)
        opt.step()
        ref_opt.step()
        assert harness.bit_equal(table.weight.detach(), ref_table.weight.detach()), f"{case.id} step {step}"
        harness.assert_state_equal(
            opt.state[table.weight], ref_opt.state[ref_table.weight], f"{case.id} step {step}"
        )
    assert torch.equal(table.weight[1], ref_table.weight[1])
    state = opt.state[table.weight]
    if ROW_STEP in state and "step" in state:
        assert state[ROW_STEP][1] == 0, "padding_idx got zero grads: never active"


# -- the cost: rows touched, not the table --------------------------------------------------------

_ROW_OPS = {
    "index_select",
    "index_copy",
    "index_copy_",
    "detach",
    "alias",
    "slice",
    "select",
    "view",
    "_reshape_alias",
    "as_strided",
    "split_with_sizes",
    "split",
    "expand",
}


class _TableOps(TorchDispatchMode):
    """Records every operator that makes or reads a tensor of at least ``big`` elements other
    than as a view, a row gather (``index_select``) or a row scatter (``index_copy_``)."""

    def __init__(self, big: int) -> None:
        super().__init__()
        self.big = big
        self.seen: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in _ROW_OPS:
            tensors = [
                t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, Tensor)
            ]
            if any(t.layout is torch.strided and t.numel() >= self.big for t in tensors):
                self.seen.append(f"{name}{[tuple(t.shape) for t in tensors]}")
        return out


@pytest.mark.parametrize("config", cases.ROW_CONFIGS, ids=str)
@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_a_step_costs_the_rows_touched(config: tuple[type, dict[str, Any]], impl: str) -> None:
    """Once the table's state exists, no operator of a step allocates or reads anything the size
    of the table: only gathers and scatters of the rows the grad names touch it."""
    torch_cls, kwargs = config
    if reason := cases.torch_lacks(torch_cls, kwargs):
        pytest.skip(reason)
    n, width = 20_000, 4
    table = nn.Parameter(torch.randn(n, width))
    opt = cases.TWINS[torch_cls]([table], lr=0.1, **kwargs, **IMPLS[impl], lazy="rows")
    gen = torch.Generator().manual_seed(0)

    def lookup(k: int) -> Tensor:
        rows = torch.randint(0, n, (k,), generator=gen)
        return torch.sparse_coo_tensor(
            rows[None], torch.randn(k, width, generator=gen), (n, width), check_invariants=True
        )

    for _ in range(3):  # state, row_step and rows with different counts
        table.grad = lookup(50)
        opt.step()
    assert ROW_STEP in opt.state[table] or torch_cls is torch.optim.SGD and not kwargs.get("momentum")
    table.grad = lookup(50)
    with _TableOps(big=n) as ops:
        opt.step()
    assert not ops.seen, f"operators over the whole table: {ops.seen}"


def test_the_cost_check_sees_a_pass_over_the_table() -> None:
    """The same check fails for a step that reads the whole table: a dense grad's row check."""
    n = 20_000
    table = nn.Parameter(torch.randn(n, 4))
    opt = safeopt.Adam([table], lr=0.1, lazy="rows")
    table.grad = torch.zeros(n, 4)
    table.grad[:3] = 1
    opt.step()
    with _TableOps(big=n) as ops:
        opt.step()
    assert ops.seen


# -- grads, failures, checkpoints -------------------------------------------------------------------


@pytest.mark.parametrize("in_place", [False, True], ids=["gathered", "in place"])
@pytest.mark.parametrize("rows", ["some", "all"])
def test_a_raising_step_keeps_the_sparse_grad_and_leaves_no_trace(
    in_place: bool, rows: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's step raising (Adam refusing a 1-d parameter's sparse grad in the same group): the
    table's sparse grad is the same tensor with the same entries, the table and its state are as
    they were (state made for this step is taken out again), and no rows are left in the state."""
    monkeypatch.setattr(_rows, "_RUN_BYTES", 1 if in_place else 2**62)
    table, fresh = nn.Parameter(torch.ones(4, 2)), nn.Parameter(torch.ones(4, 2))
    bias = nn.Parameter(torch.ones(3))
    opt = safeopt.Adam([table, fresh, bias], lr=0.1, lazy="rows")
    table.grad = torch.sparse_coo_tensor([[0, 2]], torch.ones(2, 2), (4, 2), check_invariants=True)
    opt.step()
    index = [[3, 1, 3]] if rows == "some" else [[3, 1, 0, 2, 3]]
    grad = torch.sparse_coo_tensor(
        index, torch.arange(2.0 * len(index[0])).reshape(-1, 2) + 1, (4, 2), check_invariants=True
    )
    kept = grad.clone()
    table.grad, fresh.grad = grad, grad.clone()
    bias.grad = torch.sparse_coo_tensor([[0]], [1.0], (3,), check_invariants=True)
    saved, saved_state = table.detach().clone(), harness.clone_state(opt.state[table])
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert table.grad is grad and sparse_equal(grad, kept)
    assert fresh.grad.is_sparse
    assert harness.bit_equal(table.detach(), saved) and torch.equal(fresh.detach(), torch.ones(4, 2))
    harness.assert_state_equal(opt.state[table], saved_state, "the table after the failed step")
    assert set(opt.state) <= {table, fresh, bias}, "gathered rows left in the optimizer state"
    if rows == "some":
        assert not opt.state.get(fresh), "state made for the failed step was kept"


def test_dense_and_sparse_steps_share_the_state_and_torch_continues() -> None:
    """Sparse steps, then a dense one on the same table, then torch loading the state_dict: the
    state is torch's layout (plus row_step) whatever the grad's layout."""
    table, ref = nn.Parameter(torch.randn(6, 3)), nn.Parameter(torch.randn(6, 3))
    ref.data.copy_(table)
    opt, ref_opt = (
        safeopt.AdamW([table], lr=0.1, amsgrad=True, lazy="rows"),
        safeopt.AdamW([ref], lr=0.1, amsgrad=True, lazy="rows"),
    )
    grads = [
        torch.sparse_coo_tensor([[0, 4, 0]], torch.randn(3, 3), (6, 3), check_invariants=True),
        torch.sparse_coo_tensor([[5, 5]], torch.randn(2, 3), (6, 3), check_invariants=True),
        torch.randn(6, 3),
        torch.sparse_coo_tensor([[1]], torch.randn(1, 3), (6, 3), check_invariants=True),
    ]
    for grad in grads:
        table.grad, ref.grad = grad, densify(grad)
        opt.step()
        ref_opt.step()
    assert harness.bit_equal(table.detach(), ref.detach())
    harness.assert_state_equal(opt.state[table], ref_opt.state[ref], "after mixed steps")
    assert opt.state[table][ROW_STEP].tolist() == [2.0, 2.0, 1.0, 1.0, 2.0, 2.0]
    assert set(opt.state[table]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", ROW_STEP}
    saved = harness.roundtrip(opt.state_dict())
    q = nn.Parameter(table.detach().clone())
    torch_opt = torch.optim.AdamW([q], lr=0.1, amsgrad=True)
    torch_opt.load_state_dict(saved)
    q.grad = torch.ones_like(q)
    torch_opt.step()
    assert float(torch_opt.state[q]["step"]) == 5


def test_groups_without_rows_keep_the_tensor_rule() -> None:
    """lazy=True: the sparse grad is torch's business. SGD steps it as torch would (summing
    duplicates its own way); Adam raises torch's error and changes nothing."""
    grad = torch.sparse_coo_tensor([[1, 1, 3]], torch.ones(3, 2), (4, 2), check_invariants=True)
    w, q = nn.Parameter(torch.ones(4, 2)), nn.Parameter(torch.ones(4, 2))
    opt = safeopt.SGD([w], lr=0.1, momentum=0.9)
    ref = torch.optim.SGD([q], lr=0.1, momentum=0.9)
    for _ in range(2):
        w.grad, q.grad = grad, grad.clone()
        opt.step()
        ref.step()
    assert harness.bit_equal(w.detach(), q.detach())
    assert ROW_STEP not in opt.state[w]
    a = nn.Parameter(torch.ones(4, 2))
    adam = safeopt.Adam([a], lr=0.1)
    a.grad = grad
    with pytest.raises(RuntimeError, match="Adam does not support sparse gradients"):
        adam.step()
    assert torch.equal(a.detach(), torch.ones(4, 2)) and a.grad is grad


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.complex64], ids=str
)
@pytest.mark.parametrize("width", [64, 8, 3, 0])
def test_row_write_backs_copy_every_bit(dtype: torch.dtype, width: int) -> None:
    """Write-backs move rows as 16-byte elements where the layout allows (``_copy_rows``): every
    bit pattern arrives as it was, signalling NaN payloads and -0.0 included, whatever the width
    (rows of a multiple of 16 bytes go the wide way, others the plain way)."""
    gen = torch.Generator().manual_seed(0)
    size = torch.empty((), dtype=dtype).element_size()
    raw = {2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    real_width = width * (2 if dtype.is_complex else 1)
    bits = torch.randint(-(2**15), 2**15, (40, real_width * size // 2), generator=gen, dtype=torch.int16)
    table = bits.view(raw).view(dtype) if real_width else torch.zeros(40, 0, dtype=dtype)
    src = torch.randint(-(2**15), 2**15, (5, real_width * size // 2), generator=gen, dtype=torch.int16)
    src = src.view(raw).view(dtype) if real_width else torch.zeros(5, 0, dtype=dtype)
    rows = torch.tensor([7, 0, 39, 12, 3])
    expected = table.clone()
    for i, r in enumerate(rows.tolist()):
        expected[r] = src[i]  # a plain assignment of each row
    _rows._copy_rows(table, rows, src)
    assert harness.bit_equal(table, expected)
    assert torch.equal(harness.bits(table), harness.bits(expected))
