"""The row check on wide rows (whole experts) left open by their first element: read where they
lie, one row at a time, with the same answer as the whole-grad pass, sign bits included."""

from __future__ import annotations

import pytest
import torch

from safeopt import _row_rule
from safeopt._row_rule import active_rows


def expected(grad: torch.Tensor) -> torch.Tensor:
    flat = grad.reshape(grad.shape[0], -1)
    return (flat.ne(0) | flat.isnan()).any(1).nonzero().squeeze(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "gathered"])
def test_open_wide_rows_are_judged_like_the_whole_grad(
    dtype: torch.dtype, in_place: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not in_place:
        monkeypatch.setattr(_row_rule, "_IN_PLACE_ROWS", 0)
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(16, 8, 128, generator=gen).to(dtype)  # rows of 1024 elements: wide
    tiny = torch.finfo(dtype).tiny / 4  # a subnormal: nonzero
    grad[1] = 0.0  # idle
    grad[2] = -0.0  # idle: -0.0 is zero
    grad[3] = 0.0
    grad[3, 5, 7] = float("nan")  # active
    grad[4] = -0.0
    grad[4, 7, 127] = -tiny  # active: sign byte set, a mantissa bit too
    grad[5] = 0.0
    grad[5, 0, 1] = 2.0  # first element zero, the next not: active
    grad[6] = 0.0
    grad[6, 3, 3] = -0.0
    rows = active_rows(grad)
    assert torch.equal(rows, expected(grad)), rows
    assert rows.tolist() == [0, 3, 4, 5, *range(7, 16)]


SCHEDULE = [(0, 1, 2), (3, 4), (0, 1, 2, 3, 4, 5), (2, 5)]  # the active experts of each step


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (torch.optim.AdamW, {"weight_decay": 0.1, "foreach": False}),
        (torch.optim.AdamW, {"weight_decay": 0.1, "foreach": True}),
        (torch.optim.AdamW, {"weight_decay": 0.1, "fused": True}),
        (torch.optim.SGD, {"momentum": 0.9, "weight_decay": 0.1, "foreach": True}),
        (torch.optim.SGD, {"momentum": 0.9, "nesterov": True, "fused": True}),
    ],
    ids=["adamw-forloop", "adamw-foreach", "adamw-fused", "sgd-foreach", "sgd-nesterov-fused"],
)
def test_whole_experts_stepped_in_place_equal_each_expert_stepped_alone(cls: type, kwargs: dict) -> None:
    """Experts of 16 KB: runs of active experts are stepped as views of the parameter and its
    state; SGD rows taking their first step get the momentum buffer torch makes for them."""
    import safeopt

    gen = torch.Generator().manual_seed(0)
    start = torch.randn(6, 64, 64, generator=gen)
    experts = torch.nn.Parameter(start.clone())
    opt = getattr(safeopt, cls.__name__)([experts], lr=0.1, lazy="rows", **kwargs)
    alone = [torch.nn.Parameter(start[i].clone()) for i in range(6)]
    refs = [cls([p], lr=0.1, **kwargs) for p in alone]
    for active in SCHEDULE:
        grad = torch.zeros_like(experts)
        for i in active:
            grad[i] = torch.randn(64, 64, generator=gen)
            alone[i].grad = grad[i].clone()
            refs[i].step()
        experts.grad = grad
        opt.step()
        for i in range(6):
            assert torch.equal(experts[i], alone[i]), i
            for key, value in refs[i].state.get(alone[i], {}).items():
                if key != "step":
                    assert torch.equal(opt.state[experts][key][i], value), (i, key)
    counts = [sum(i in a for a in SCHEDULE) for i in range(6)]
    if cls is torch.optim.AdamW:
        assert opt.state[experts]["row_step"].tolist() == counts
