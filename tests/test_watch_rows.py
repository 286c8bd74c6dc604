"""``watch`` at slice granularity: idle slices along dim 0 (experts, embedding rows) of a
parameter that has a gradient are counted, their moves added up, and nothing the optimizer
computes changes. Models as transformers builds them: tests/test_moe.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import safeopt
from harness import bit_equal

IDLE = {0: (1, 3), 1: (1,), 2: (1, 3)}  # step -> the slices of "experts" whose grad is zero


class Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.experts = nn.Parameter(torch.randn(4, 3, 2, generator=gen, dtype=torch.float64))
        self.dense = nn.Parameter(torch.randn(3, 2, generator=gen, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64))


def set_grads(model: Experts, step: int) -> None:
    gen = torch.Generator().manual_seed(50 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    for row in IDLE[step]:
        model.experts.grad[row] = 0.0
    model.experts.grad[1, 0, 0] = -0.0  # -0.0 is zero


def test_watch_counts_idle_slices_of_a_parameter_with_a_gradient() -> None:
    model = Experts()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    w = safeopt.watch(opt, model)
    total = torch.zeros_like(model.experts)  # the idle slices' moves, added up independently
    for step, idle in IDLE.items():
        set_grads(model, step)
        before = model.experts.detach().clone()
        opt.step()
        for row in idle:
            total[row] += model.experts[row].detach() - before[row]
    report = w.report()
    by_name = {p.name: p for p in report.params}
    assert set(by_name) == {"experts"}  # dense and bias have every slice active: no entry
    row = by_name["experts"]
    assert (row.idle_steps, row.moved_steps) == (0, 0)  # the parameter always had a gradient
    assert row.rows is not None
    assert row.rows.slices == 4 and row.rows.idle_slices == 2
    assert row.rows.idle_slice_steps == row.rows.moved_slice_steps == 5
    assert row.rows.moved_slices == (1, 3)
    assert row.rows.l2 == pytest.approx(float(total.norm()), rel=1e-12)
    assert row.rows.max_abs == pytest.approx(float(total.abs().max()), rel=1e-12)
    assert report and report.moved == [row]
    assert report.l2 == pytest.approx(float(total.norm()), rel=1e-12)
    text = str(report)
    assert "1 parameter(s) had idle slices along dim 0" in text and "1 of them moved there" in text
    assert "experts" in text and "2/4" in text and "1,3" in text


def test_watch_slices_under_lazy_rows_report_no_move() -> None:
    model = Experts()
    opt = safeopt.AdamW(
        [{"params": [model.experts], "lazy": "rows"}, {"params": [model.dense, model.bias]}],
        lr=0.1,
        weight_decay=0.1,
    )
    w = safeopt.watch(opt, model)
    for step in IDLE:
        set_grads(model, step)
        opt.step()
    report = w.report()
    assert not report
    (row,) = report.params
    assert row.rows is not None and row.rows.idle_slice_steps == 5 and row.rows.moved_slice_steps == 0
    assert row.rows.moved_slices == () and row.rows.l2 == 0.0
    assert "no ghost update" in str(report)


@pytest.mark.parametrize("impl", ["forloop", "foreach", "fused"])
def test_watching_slices_changes_nothing_the_optimizer_computes(impl: str) -> None:
    kwargs = {"foreach": impl == "foreach", "fused": impl == "fused"}
    plain_model, watched_model = Experts(), Experts()
    plain = torch.optim.AdamW(plain_model.parameters(), lr=0.1, weight_decay=0.1, **kwargs)
    watched = torch.optim.AdamW(watched_model.parameters(), lr=0.1, weight_decay=0.1, **kwargs)
    w = safeopt.watch(watched, watched_model)
    for step in IDLE:
        set_grads(plain_model, step)
        set_grads(watched_model, step)
        grads = [p.grad.clone() for p in watched_model.parameters()]
        plain.step()
        watched.step()
        assert all(bit_equal(p.grad, g) for p, g in zip(watched_model.parameters(), grads))
    for p, q in zip(plain_model.parameters(), watched_model.parameters()):
        assert bit_equal(p, q)
        for key, value in plain.state[p].items():
            assert bit_equal(value, watched.state[q][key])
    assert w.report().params[0].rows is not None


def test_watch_slices_with_a_closure() -> None:
    model = Experts()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    w = safeopt.watch(opt, model)
    for step in IDLE:

        def closure(step: int = step) -> torch.Tensor:
            set_grads(model, step)
            return torch.zeros(())

        opt.step(closure)
    (row,) = w.report().params
    assert row.rows is not None and row.rows.idle_slice_steps == row.rows.moved_slice_steps == 5


def test_watch_report_as_dict_has_rows_only_where_slices_were_idle() -> None:
    model = Experts()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    w = safeopt.watch(opt, model)
    for step in IDLE:
        set_grads(model, step)
        model.bias.grad = torch.zeros_like(model.bias)  # idle as a whole: no rows entry
        opt.step()
    data = json.loads(json.dumps(w.report().as_dict()))
    assert data["steps"] == 3 and len(data["history"]) == 3
    params = {p["name"]: p for p in data["params"]}
    assert set(params) == {"experts", "bias"}
    assert set(params["bias"]) == {"name", "shape", "idle_steps", "moved_steps", "l2", "max_abs"}
    assert params["bias"]["idle_steps"] == params["bias"]["moved_steps"] == 3
    rows = params["experts"]["rows"]
    assert rows["idle_slice_steps"] == rows["moved_slice_steps"] == 5
    assert rows["moved_slices"] == [1, 3] and rows["slices"] == 4 and rows["idle_slices"] == 2


def test_watch_copies_only_the_idle_slices() -> None:
    """The pre-step copy of a parameter with a gradient is its idle slices, not the parameter."""
    model = Experts()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    w = safeopt.watch(opt, model)
    set_grads(model, 0)
    w._before(opt, (opt,), {})  # the pre-hook alone: what it keeps for the post-hook
    pending = w._pending_rows
    assert [(p is model.experts, rows.tolist(), tuple(copy.shape)) for p, rows, copy in pending] == [
        (True, [1, 3], (2, 3, 2))
    ]
    assert w._pending == (False, [])
    w.remove()
    assert w._pending_rows == []


def test_watch_slices_of_a_sparse_embedding_grad() -> None:
    table = nn.Embedding(6, 2, sparse=True)
    opt = torch.optim.SGD(table.parameters(), lr=0.1, momentum=0.9)
    w = safeopt.watch(opt, table)
    for ids in ([0, 1], [1, 2], [4]):
        opt.zero_grad()
        table(torch.tensor(ids)).sum().backward()
        opt.step()
    (row,) = w.report().params
    # rows never looked up: 3 and 5 in every step; momentum moves rows once they have a buffer
    assert row.rows is not None and row.rows.slices == 6
    assert row.rows.idle_slice_steps == 4 + 4 + 5


def test_a_nan_slice_that_stays_nan_did_not_move_and_adds_no_nan() -> None:
    model = Experts()
    with torch.no_grad():
        model.experts[3] = float("nan")  # decay keeps it NaN: no change, as the whole-tensor watch counts it
    opt = torch.optim.AdamW([model.experts], lr=0.1, weight_decay=0.1)
    w = safeopt.watch(opt, model)
    for step in IDLE:
        set_grads(model, step)
        opt.step()
    (row,) = w.report().params
    assert row.rows is not None
    assert row.rows.idle_slice_steps == 5 and row.rows.moved_slice_steps == 3
    assert row.rows.moved_slices == (1,)
    assert row.rows.l2 > 0 and math.isfinite(row.rows.l2)  # the NaN slice added nothing
