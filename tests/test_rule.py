"""The zero check: what counts as "every element equals zero".

Every test runs three ways: decided as on the CPU (memory probe, then ``aminmax``), and as on an
accelerator (``_rule.FORCE_DEVICE``: the ``_device`` kernels), with and without the probe round.
"""

from __future__ import annotations

import pytest
import torch

import harness
from safeopt import _rule
from safeopt._rule import nonzero_flags


@pytest.fixture(autouse=True, params=["host", "device", "device-no-probe"])
def decision(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(_rule, "FORCE_DEVICE", request.param != "host")
    monkeypatch.setattr(_rule, "DEVICE_PROBE", request.param != "device-no-probe")
    return str(request.param)


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64]


def tiny(dtype: torch.dtype) -> float:
    return torch.finfo(dtype.to_real() if dtype.is_complex else dtype).smallest_normal / 4


@pytest.mark.parametrize("where", [0, -1], ids=["first element", "last element"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_kinds_are_zero_and_everything_else_is_not(dtype: torch.dtype, where: int) -> None:
    """The value sits where the CPU probe looks (first) and where only the full check sees it."""

    def with_last(value: complex) -> torch.Tensor:
        t = torch.zeros(5, dtype=dtype)
        t[where] = value
        return t

    grads = {
        "+0": torch.zeros(5, dtype=dtype),
        "-0": torch.full((5,), -0.0, dtype=dtype),
        "empty": torch.zeros(0, dtype=dtype),
        "0-d zero": torch.zeros((), dtype=dtype),
        "one": with_last(1.0),
        "subnormal": with_last(tiny(dtype)),
        "nan": with_last(float("nan")),
        "inf": with_last(float("inf")),
        "-inf": with_last(float("-inf")),
        "0-d one": torch.ones((), dtype=dtype),
    }
    expected = {"+0": False, "-0": False, "empty": False, "0-d zero": False}
    flags = nonzero_flags(list(grads.values()))
    assert dict(zip(grads, flags)) == {name: expected.get(name, True) for name in grads}
    assert (
        grads["subnormal"][where] != 0
        and abs(grads["subnormal"][where])
        < torch.finfo(dtype.to_real() if dtype.is_complex else dtype).smallest_normal
    ), "value was not subnormal"


def test_complex_counts_either_part() -> None:
    grads = [
        torch.tensor([0j, 0j]),
        torch.tensor([0j, 1j]),
        torch.tensor([complex(-0.0, -0.0)]),
        torch.tensor([1j, 0j]),
        torch.tensor([complex(1, -0.0)]),
        torch.tensor([complex(-0.0, 0.0)], dtype=torch.complex128),
        torch.tensor([complex(0.0, 2.0)], dtype=torch.complex128),
    ]
    assert nonzero_flags(grads) == [False, True, False, True, True, False, True]


def test_non_contiguous_offset_and_expanded_grads() -> None:
    base = torch.zeros(4, 6)
    base[3, 0] = 2.0
    base[0, 0] = 5.0  # outside every view below but the first
    views = [base.t(), base[:, 1:], torch.zeros(1).expand(10), base[1::2, ::5], base[1:, 1:].t(), base[0, 1:]]
    assert nonzero_flags(views) == [True, False, False, True, False, False]


def test_integer_and_bool_tensors_fall_back_to_the_full_check() -> None:
    assert nonzero_flags([torch.tensor([0, 3]), torch.tensor([False, False]), torch.tensor([7])]) == [
        True,
        False,
        True,
    ]


def test_sparse_grads_check_their_values_after_coalescing() -> None:
    cancel = torch.sparse_coo_tensor(
        torch.tensor([[1, 1]]), torch.tensor([2.0, -2.0]), (4,), check_invariants=True
    )
    kept = torch.sparse_coo_tensor(
        torch.tensor([[1, 2]]), torch.tensor([2.0, 0.0]), (4,), check_invariants=True
    )
    empty = torch.sparse_coo_tensor(
        torch.zeros(1, 0, dtype=torch.long), torch.zeros(0), (4,), check_invariants=True
    )
    assert nonzero_flags([cancel, kept, empty]) == [False, True, False]


def test_no_grads_no_work() -> None:
    assert nonzero_flags([]) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_values_made_of_sign_bytes(dtype: torch.dtype) -> None:
    """Nonzero values whose only set bits sit in one 0x80 byte (tiny subnormals or the smallest
    normal), next to -0.0 (whose only set bit is the sign), count; -0.0 alone does not."""
    size = torch.empty((), dtype=dtype).element_size()
    odd = [0x80 << (8 * k) for k in range(size - 1)]  # positive, one 0x80 byte below the sign byte
    neg_zero = 0x80 << (8 * (size - 1))
    cases = {"-0 only": ([neg_zero, neg_zero], False), "+0 and -0": ([0, neg_zero, 0], False)}
    for k, bits in enumerate(odd):
        cases[f"0x80 at byte {k}"] = ([0, bits], True)
        cases[f"0x80 at byte {k} next to -0"] = ([0, neg_zero, bits], True)
        cases[f"-(0x80 at byte {k})"] = ([0, neg_zero | bits], True)
    grads = [torch.cat([harness.from_bits(b, dtype) for b in bits]) for bits, _ in cases.values()]
    assert all(g.view(torch.uint8).max().item() == 0x80 for g in grads)
    assert dict(zip(cases, nonzero_flags(grads))) == {name: flag for name, (_, flag) in cases.items()}
