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
