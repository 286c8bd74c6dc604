"""What the host decision and the step path cost, pinned where it can be counted (issue 22, item 3).

- Every verdict of the host's full check is torch's comparison with zero: -0.0 is zero; NaN, inf
  and subnormals are not; conjugate, negative, transposed and 0-d views included.
- The step path's shortcuts (the eager call of ``untraced`` functions, the step's cached
  structure) change no result: checked against torch where the groups change between steps.
"""

from __future__ import annotations

import pytest
import torch

import harness
import safeopt
from safeopt import _rule, _torch_compat


def _subnormal(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny / 4


def _cases() -> list[tuple[str, torch.Tensor]]:
    z = torch.zeros(6, 4)
    neg_zero = torch.full((6, 4), -0.0)
    sub = z.clone()
    sub[3, 2] = _subnormal(torch.float32)
    nan = z.clone()
    nan[5, 3] = float("nan")
    neg = z.clone()
    neg[2, 1] = -1e-3
    mixed = neg_zero.clone()
    mixed[0, 1] = 0.0
    cz = torch.zeros(5, dtype=torch.complex64)
    cnz = cz.clone()
    cnz[4] = 1j
    half_sub = torch.zeros(7, dtype=torch.float16)
    half_sub[6] = _subnormal(torch.float16)
    return [
        ("zeros", z),
        ("-0.0", neg_zero),
        ("+0.0 and -0.0", mixed),
        ("a subnormal", sub),
        ("a NaN", nan),
        ("a negative", neg),
        ("transposed zeros", z.t()),
        ("transposed negative", neg.t()),
        ("strided zeros", torch.zeros(12)[::2]),
        ("0-dim zero", torch.zeros(())),
        ("0-dim -0.0", torch.tensor(-0.0)),
        ("empty", torch.zeros(0, 3)),
        ("conj zeros", cz.conj()),
        ("conj nonzero", cnz.conj()),
        ("neg view of zeros", torch._neg_view(z)),
        ("neg view of a negative", torch._neg_view(neg)),
        ("float16 subnormal", half_sub),
        ("bfloat16 -0.0", torch.full((3,), -0.0, dtype=torch.bfloat16)),
    ]


@pytest.mark.parametrize(("name", "grad"), _cases(), ids=[name for name, _ in _cases()])
def test_verdict_is_torchs_comparison(name: str, grad: torch.Tensor) -> None:
    expected = bool((grad.resolve_conj().resolve_neg() != 0).any())
    assert _rule.nonzero_flags([grad]) == [expected], name
    assert _rule._has_nonzero(grad) is expected, name


def test_zero_grads_idle_nonzero_active_in_a_step() -> None:
    """The byte pass decides a real step: the zero and -0.0 grads stay idle, the others step as torch."""
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(4, 3, generator=gen) for _ in range(4)]
    grads = [torch.zeros(4, 3), torch.full((4, 3), -0.0), torch.randn(4, 3, generator=gen), torch.zeros(4, 3)]
    grads[3][3, 2] = 1e-3  # first element zero: the full check finds the value
    params = [torch.nn.Parameter(v.clone()) for v in values]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt = safeopt.Adam(params, lr=0.1, fused=True)
    opt.step()
    ref = [torch.nn.Parameter(values[i].clone()) for i in (2, 3)]
    for p, i in zip(ref, (2, 3)):
        p.grad = grads[i].clone()
    torch.optim.Adam(ref, lr=0.1, fused=True).step()
    assert harness.bit_equal(params[0], values[0]) and harness.bit_equal(params[1], values[1])
    assert harness.bit_equal(params[2], ref[0]) and harness.bit_equal(params[3], ref[1])


# -- the step path: untraced calls ----------------------------------------------------------------


@pytest.mark.skipif(
    not _torch_compat.EAGER_SHORTCUT,
    reason=f"torch {torch.__version__}: untraced has no eager shortcut before 2.11",
)
def test_an_untraced_call_in_eager_sets_no_frame_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    """In eager code (no compiled region running), an ``untraced`` function is called as it is: the
    dynamo-disabled call would set and reset the frame callback around it, several times a step.
    safeopt's step sets it as often as torch's own step does."""
    from torch._dynamo import eval_frame

    calls = []
    real = eval_frame.set_eval_frame

    def counted(callback: object) -> object:
        calls.append(callback)
        return real(callback)

    monkeypatch.setattr(eval_frame, "set_eval_frame", counted)
    counts = []
    for cls in (torch.optim.Adam, safeopt.Adam):
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.ones(3)
        opt = cls([p], lr=0.1)
        calls.clear()
        opt.step()
        counts.append(len(calls))
    assert counts[1] == counts[0], (
        f"torch's step sets the frame callback {counts[0]} times, safeopt's {counts[1]}"
    )


def test_an_untraced_function_runs_untraced_under_compile() -> None:
    """Under ``torch.compile`` an ``untraced`` function still runs eagerly, with no frame callback set
    (nothing it calls is traced), and the compiled function around it gives the same result."""
    from torch._C._dynamo.eval_frame import get_eval_frame_callback

    from safeopt._torch_compat import untraced

    seen: list[tuple[bool, object]] = []

    @untraced
    def inner(x: torch.Tensor) -> torch.Tensor:
        seen.append((torch.compiler.is_compiling(), get_eval_frame_callback()))
        return x + 1

    def outer(x: torch.Tensor) -> torch.Tensor:
        return inner(x * 2) * 3

    torch._dynamo.reset()
    compiled = torch.compile(outer, backend="eager")
    x = torch.arange(3.0)
    assert torch.equal(compiled(x), outer(x))
    assert seen and all(not compiling and callback is None for compiling, callback in seen), seen


@pytest.mark.skipif(
    not _torch_compat.EAGER_SHORTCUT,
    reason=f"torch {torch.__version__}: untraced has no eager shortcut before 2.11",
)
def test_the_eager_shortcut_is_taken_on_this_torch() -> None:
    """Canary: ``untraced`` skips the disabled call in eager code through dynamo's
    ``get_eval_frame_callback``; a torch without it gets the disabled call every time (slower, as
    before), which this names."""
    frames = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
    assert callable(getattr(frames, "get_eval_frame_callback", None)), (
        f"torch {torch.__version__} has no torch._C._dynamo.eval_frame.get_eval_frame_callback: "
        "untraced functions take the disabled call in eager code too"
    )
    assert (
        getattr(_rule.plan_step, "_torchdynamo_disable", False) is False
    )  # the shortcut, not torch's wrapper
