"""Edges of the rule (issue 20, items 1, 2, 8 and 10).

- A parameter held twice in a group (torch only warns) is frozen, unfrozen and reported at
  every position it has; with ``lazy="rows"`` its rows are stepped as torch steps the duplicate.
- Grads whose memory torch cannot vouch for (ZeroTensors, resized or zero-byte storages, tensor
  subclasses, conj and neg views) are never read raw on the host: whatever could crash the
  interpreter runs in a subprocess, so that a segfault fails its test instead of the test run.
- Under ``torch.set_flush_denormal(True)`` a subnormal-only grad has one verdict wherever the
  subnormal sits.
- An empty group is frozen only when it was frozen.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import harness
import safeopt
from safeopt import _rule
from safeopt._row_rule import active_rows
from safeopt._rows import ROW_STEP

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings(
    "ignore:optimizer contains a parameter group with duplicate parameters"
)


# -- item 1: a parameter held twice ----------------------------------------------------------------


def _dup_adam(**kwargs: Any) -> tuple[nn.Parameter, safeopt.Adam]:
    p = nn.Parameter(torch.ones(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = safeopt.Adam([p, p], lr=0.1, **kwargs)
    return p, opt


def test_freezing_a_duplicate_freezes_every_position_and_it_does_not_move() -> None:
    p, opt = _dup_adam()
    opt.freeze(p)
    assert opt.param_groups[0]["frozen_params"] == [0, 1]
    assert opt.is_frozen(p) and opt.is_frozen(0)
    before = p.detach().clone()
    p.grad = torch.ones(3)
    opt.step()
    assert harness.bit_equal(p.detach(), before)
    assert float(opt.state[p].get("step", 0)) == 0


def test_unfreezing_a_duplicate_unfreezes_every_position_and_it_steps_as_torch_does() -> None:
    p, opt = _dup_adam()
    q = nn.Parameter(torch.ones(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.optim.Adam([q, q], lr=0.1)
    opt.freeze(p)
    opt.unfreeze(p)
    assert opt.param_groups[0]["frozen_params"] == [] and not opt.is_frozen(p)
    for _ in range(2):
        p.grad, q.grad = torch.ones(3), torch.ones(3)
        opt.step()
        ref.step()
    assert harness.bit_equal(p.detach(), q.detach())
    harness.assert_state_equal(opt.state[p], ref.state[q], "duplicate, unfrozen")


def test_a_duplicate_frozen_at_one_position_only_is_frozen_everywhere() -> None:
    """frozen_params written by hand (or loaded) naming one of the positions: the parameter is
    frozen, is_frozen says so, it does not move, and unfreeze clears every position."""
    p = nn.Parameter(torch.ones(3))
    other = nn.Parameter(torch.ones(2))
    opt = safeopt.Adam([other], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.add_param_group({"params": [p, p], "frozen_params": [1]})
    assert opt.is_frozen(p) and opt.is_frozen(1)
    before = p.detach().clone()
    p.grad = torch.ones(3)
    opt.step()
    assert harness.bit_equal(p.detach(), before)
    opt.unfreeze(p)
    assert opt.param_groups[1]["frozen_params"] == []


def test_frozen_context_and_module_targets_cover_every_position() -> None:
    lin = nn.Linear(2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = safeopt.Adam([lin.weight, lin.bias, lin.weight], lr=0.1)
    before = lin.weight.detach().clone()
    with opt.frozen(lin.weight):
        assert opt.param_groups[0]["frozen_params"] == [0, 2] and opt.is_frozen(lin.weight)
        lin.weight.grad, lin.bias.grad = torch.ones(2, 2), torch.ones(2)
        opt.step()
    assert harness.bit_equal(lin.weight.detach(), before)
    assert opt.param_groups[0]["frozen_params"] == [] and not opt.is_frozen(lin.weight)
    opt.freeze(lin)
    assert opt.param_groups[0]["frozen_params"] == [0, 1, 2]
    opt.unfreeze([lin.weight])
    assert opt.param_groups[0]["frozen_params"] == [1]


@pytest.mark.parametrize("impl", [{"foreach": False}, {"foreach": True}], ids=["forloop", "foreach"])
def test_rows_duplicate_with_every_row_active_is_torchs_duplicate_step(impl: dict[str, Any]) -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3))
    q = nn.Parameter(w.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = safeopt.Adam([w, w], lr=0.1, lazy="rows", **impl)
        ref = torch.optim.Adam([q, q], lr=0.1, **impl)
    for _ in range(3):
        g = torch.randn(4, 3)
        w.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert harness.bit_equal(w.detach(), q.detach())
    harness.assert_state_equal(opt.state[w], ref.state[q], "rows, every row active")


def _row_grads() -> list[Tensor]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for active in ([1], [0, 1, 3], [1, 2], [0, 1, 2, 3], [3]):
        g = torch.zeros(4, 3)
        g[active] = torch.randn(len(active), 3, generator=gen)
        out.append(g)
    return out


@pytest.mark.parametrize("width", [3, 8192], ids=["gathered", "in-place"])
def test_rows_duplicate_steps_each_row_as_torch_steps_the_duplicate(width: int) -> None:
    """torch's forloop Adam given ``[w, w]`` takes two updates of ``w`` in a row, counting both.
    Under rows each active row does the same: the duplicate list equals two steps of the
    parameter held once, and ``step`` and ``row_step`` count two per step."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, width))
    once = nn.Parameter(w.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = safeopt.Adam([w, w], lr=0.1, lazy="rows", foreach=False)
    ref = safeopt.Adam([once], lr=0.1, lazy="rows", foreach=False)
    for g in _row_grads():
        g = g[:, :1].expand(4, width).contiguous()
        w.grad = g.clone()
        opt.step()
        for _ in range(2):
            once.grad = g.clone()
            ref.step()
        assert harness.bit_equal(w.grad, g)
    assert harness.bit_equal(w.detach(), once.detach())
    harness.assert_state_equal(opt.state[w], ref.state[once], "rows duplicate")
    assert opt.state[w][ROW_STEP].tolist() == [4.0, 8.0, 4.0, 6.0]
    assert float(opt.state[w]["step"]) == 10


def test_rows_duplicate_counts_two_per_step_in_foreach_too() -> None:
    w = nn.Parameter(torch.zeros(3, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = safeopt.Adam([w, w], lr=0.1, lazy="rows", foreach=True)
    for active in ([0], [0, 2]):
        g = torch.zeros(3, 2)
        g[active] = 1.0
        w.grad = g
        opt.step()
    assert opt.state[w][ROW_STEP].tolist() == [4.0, 0.0, 2.0]
    assert float(opt.state[w]["step"]) == 4
    assert harness.bit_equal(w.detach()[1], torch.zeros(2))


def test_rows_duplicate_with_a_sparse_grad_gives_the_users_grad_back() -> None:
    """A sparse grad naming every row: the duplicate goes through torch whole, densified, as
    torch's ``[w, w]`` with the dense grad; the user's sparse grad comes back."""
    emb = nn.Embedding(5, 2, sparse=True)
    q = nn.Parameter(emb.weight.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = safeopt.Adam([emb.weight, emb.weight], lr=0.1, lazy="rows")
        ref = torch.optim.Adam([q, q], lr=0.1)
    emb(torch.arange(5)).sum().backward()
    grad = emb.weight.grad
    q.grad = grad.to_dense()
    opt.step()
    ref.step()
    assert emb.weight.grad is grad
    assert harness.bit_equal(emb.weight.detach(), q.detach())
    harness.assert_state_equal(opt.state[emb.weight], ref.state[q], "sparse duplicate")


def test_capturable_duplicate_is_one_call_as_torch_takes_it() -> None:
    """The step decided on the device (fused, capturable; torch accepts it on the CPU) puts a
    parameter held twice into one call twice: torch's fused Adam advances its count by two
    before updating it twice with that count. A frozen duplicate stays where it is."""
    torch.manual_seed(0)
    w, frozen = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))
    q = nn.Parameter(w.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = safeopt.Adam([w, w, frozen, frozen], lr=0.1, fused=True, capturable=True)
        ref = torch.optim.Adam([q, q], lr=0.1, fused=True, capturable=True)
    opt.freeze(frozen)
    before = frozen.detach().clone()
    for _ in range(2):
        g = torch.randn(3)
        w.grad, q.grad, frozen.grad = g.clone(), g.clone(), torch.ones(2)
        opt.step()
        ref.step()
    assert harness.bit_equal(w.detach(), q.detach())
    harness.assert_state_equal(opt.state[w], ref.state[q], "capturable duplicate")
    assert harness.bit_equal(frozen.detach(), before)


# -- item 10: an empty group ----------------------------------------------------------------------


def test_an_empty_group_is_frozen_only_when_frozen() -> None:
    p = nn.Parameter(torch.ones(2))
    opt = safeopt.Adam([{"params": [p]}, {"params": []}], lr=0.1)
    assert not opt.is_frozen(1)
    opt.freeze(1)
    assert opt.is_frozen(1)
    opt.unfreeze(1)
    assert not opt.is_frozen(1)
    with opt.frozen(1):
        assert opt.is_frozen(1)
    assert not opt.is_frozen(1)


# -- item 2: grads whose memory is not read raw ---------------------------------------------------


class _Sub(Tensor):
    pass


def _resized(n: int, offset: int, keep: int) -> Tensor:
    g = torch.ones(offset + n)[offset:]
    g.untyped_storage().resize_(keep)
    return g


# name -> (grad, whether the probe may read it)
UNREADABLE: dict[str, Callable[[], Tensor]] = {
    "zerotensor": lambda: torch._efficientzerotensor(3),
    "zerotensor-view": lambda: torch._efficientzerotensor(6)[3:],
    "resized-to-0": lambda: _resized(3, 0, 0),
    "resized-to-0-offset": lambda: _resized(3, 3, 0),
    "shrunk-below-the-element": lambda: _resized(3, 3, 8),
    "subclass": lambda: torch.ones(3).as_subclass(_Sub),
    "functional": lambda: torch._to_functional_tensor(torch.ones(3)),
}


@pytest.fixture
def no_raw_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The probe's readers replaced by ones that record the address and read nothing."""
    seen: list[int] = []

    class Fake:
        value = 0

    def reader(address: int) -> Fake:
        seen.append(address)
        return Fake()

    monkeypatch.setattr(_rule, "_PROBE", {k: (reader, *rest) for k, (_, *rest) in _rule._PROBE.items()})
    yield seen


@pytest.mark.parametrize("kind", list(UNREADABLE))
def test_the_probe_never_reads_memory_torch_does_not_vouch_for(kind: str, no_raw_reads: list[int]) -> None:
    grad = UNREADABLE[kind]()
    p = nn.Parameter(torch.ones(3))
    p.grad = grad
    group = {"params": [p], "frozen": False, "frozen_params": [], "lazy": True}
    try:
        _rule.plan_step([group])
    except RuntimeError:
        pass  # torch's own error for a grad with no data: fine, as long as nothing was read
    assert no_raw_reads == []
    assert not _rule._surely_nonzero(grad)
    assert no_raw_reads == []


def test_the_probe_still_reads_a_plain_grad(no_raw_reads: list[int]) -> None:
    """The check above can fail: a plain grad and a view into the middle of a storage are read."""
    base = torch.ones(8)
    for grad in (torch.ones(3), base[5:]):
        p = nn.Parameter(torch.ones(grad.shape))
        p.grad = grad
        _rule.plan_step([{"params": [p], "frozen": False, "frozen_params": [], "lazy": True}])
        assert no_raw_reads[-1] == grad.data_ptr()
    assert len(no_raw_reads) == 2


_CHILD = r"""
import json, sys, warnings
import torch
import safeopt
warnings.simplefilter("ignore")
entry = sys.argv[1]

class Sub(torch.Tensor):
    pass

def resized(n, offset, keep):
    g = torch.ones(offset + n)[offset:]
    g.untyped_storage().resize_(keep)
    return g

def neg_view(values):
    return torch.tensor([complex(0, v) for v in values]).conj().imag  # is_neg, no copy

GRADS = {
    "zerotensor": lambda: torch._efficientzerotensor(3),
    "zerotensor-view": lambda: torch._efficientzerotensor(6)[3:],
    "resized-to-0": lambda: resized(3, 0, 0),
    "resized-to-0-offset": lambda: resized(3, 3, 0),
    "zero-byte": lambda: torch.empty(0),
    "subclass-zero": lambda: torch.zeros(3).as_subclass(Sub),
    "subclass-one": lambda: torch.tensor([0.0, 0.0, 1.0]).as_subclass(Sub),
    "conj-zero": lambda: torch.zeros(3, dtype=torch.complex64).conj(),
    "conj-last": lambda: torch.tensor([0j, 0j, 1j], dtype=torch.complex64).conj(),
    "conj-first": lambda: torch.tensor([1j, 0j, 0j], dtype=torch.complex64).conj(),
    "neg-zero": lambda: neg_view([0.0, 0.0, 0.0]),
    "neg-last": lambda: neg_view([0.0, 0.0, 2.0]),
    "neg-first": lambda: neg_view([2.0, 0.0, 0.0]),
}
for kind in sys.argv[2:]:
    print(json.dumps({"kind": kind}), flush=True)  # the last line names the kind, if it crashes
    grad = GRADS[kind]()
    dtype = torch.complex64 if kind.startswith("conj") else torch.float32
    p = torch.nn.Parameter(torch.ones(grad.shape, dtype=dtype))
    if entry == "adam":
        opt = safeopt.Adam([p], lr=0.1)
    elif entry == "wrap":
        opt = safeopt.wrap(torch.optim.Adam([p], lr=0.1))
    else:
        opt = torch.optim.Adam([p], lr=0.1)
        watch = safeopt.watch(opt)
    before = p.detach().clone()
    p.grad = grad
    out = {"kind": kind}
    try:
        opt.step()
        out["error"] = None
    except RuntimeError as e:
        out["error"] = str(e).splitlines()[0]
    out["moved"] = not torch.equal(p.detach(), before)
    out["grad_kept"] = p.grad is grad
    out["step"] = float(opt.state[p]["step"]) if "step" in opt.state.get(p, {}) else None
    if entry == "watch":
        out["idle_steps"] = sum(d.idle_steps for d in watch.report().params)
    print(json.dumps(out), flush=True)
"""

# kind -> whether the grad has a nonzero element (None: torch has no data to step with)
CHILD_KINDS = {
    "zerotensor": False,
    "zerotensor-view": False,
    "resized-to-0": None,
    "resized-to-0-offset": None,
    "zero-byte": False,
    "subclass-zero": False,
    "subclass-one": True,
    "conj-zero": False,
    "conj-last": True,
    "conj-first": True,
    "neg-zero": False,
    "neg-last": True,
    "neg-first": True,
}


@pytest.mark.parametrize("entry", ["adam", "wrap", "watch"])
def test_grads_without_plain_storage_are_decided_without_a_crash(entry: str) -> None:
    """One child interpreter per entry point, every kind of grad in turn (a crash names the kind)."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, entry, *CHILD_KINDS],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, (
        f"{entry} with a {lines[-1]['kind'] if lines else '?'} grad: the interpreter exited with "
        f"{proc.returncode} (-11 is a segfault)\n{proc.stderr[-2000:]}"
    )
    results = {line["kind"]: line for line in lines if "error" in line}
    assert list(results) == list(CHILD_KINDS)
    for kind, nonzero in CHILD_KINDS.items():
        out = results[kind]
        assert out["grad_kept"], out
        if nonzero is None:
            # No data: safeopt's check raises torch's own error before anything moves (torch's
            # Adam itself would crash on this grad).
            assert out["error"] and "not allocated" in out["error"], out
            assert not out["moved"] and out["step"] in (None, 0.0), out
        elif kind.startswith("conj") and (nonzero or entry == "watch"):
            # torch's Adam refuses a conjugate-view grad: its own error, nothing moves. An idle
            # one (below) never reaches it.
            assert out["error"] and "conjugated" in out["error"], out
            assert not out["moved"], out
        elif entry == "watch":  # torch's Adam steps it; the watch decides, changing nothing
            assert out["error"] is None and out["step"] == 1.0, out
            assert out["idle_steps"] == (0 if nonzero else 1), out
        else:
            assert out["error"] is None, out
            assert out["moved"] == nonzero, out
            assert out["step"] == 1.0 if nonzero else out["step"] in (None, 0.0), out


def test_a_zerotensor_grad_is_idle_in_the_step_decided_on_the_device() -> None:
    """A ZeroTensor is zero by construction (known without a read): in a capturable step its
    parameter is left out, as torch leaves out a grad-less one, instead of reaching torch's fused
    kernel, which refuses ZeroTensors even when told to skip."""
    p, q = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    ref_q = nn.Parameter(torch.ones(3))
    opt = safeopt.Adam([p, q], lr=0.1, fused=True, capturable=True)
    ref = torch.optim.Adam([ref_q], lr=0.1, fused=True, capturable=True)
    zero = torch._efficientzerotensor(3)
    p.grad, q.grad, ref_q.grad = zero, torch.ones(3), torch.ones(3)
    opt.step()
    ref.step()
    assert p.grad is zero and harness.bit_equal(p.detach(), torch.ones(3))
    assert float(opt.state[p]["step"]) == 0
    assert harness.bit_equal(q.detach(), ref_q.detach())


def test_a_conjugate_grad_is_decided_by_rows_too() -> None:
    """A conjugate view's rows are active where the values' rows are: an all-zero one is idle
    (no error from deciding it); a row with a nonzero element is found."""
    c = nn.Parameter(torch.ones(3, 2, dtype=torch.complex64))
    opt = safeopt.Adam([c], lr=0.1, lazy="rows")
    c.grad = torch.zeros(3, 2, dtype=torch.complex64).conj()
    opt.step()
    assert harness.bit_equal(c.detach(), torch.ones(3, 2, dtype=torch.complex64))
    g = torch.zeros(3, 2, dtype=torch.complex64)
    g[1, 1] = 1j
    assert active_rows(g.conj()).tolist() == [1]


# -- item 8: subnormals under flush_denormal ------------------------------------------------------


def _flushing() -> bool:
    return bool(torch.tensor(torch.finfo(torch.float32).smallest_normal / 4) == 0)


@pytest.fixture(params=[False, True], ids=["keep-denormals", "flush-denormals"])
def flush(request: pytest.FixtureRequest) -> Iterator[bool]:
    was = _flushing()
    if not torch.set_flush_denormal(request.param):
        pytest.skip("this CPU cannot flush denormals")
    try:
        yield request.param
    finally:
        torch.set_flush_denormal(was)


SUBNORMAL_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64]


_INTS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _subnormal_grad(dtype: torch.dtype, at: int, n: int = 5) -> Tensor:
    """Zeros but a subnormal (exponent bits 0, mantissa 8) at ``at``; made from bits, since
    writing a subnormal with denormals flushed writes a zero."""
    real = dtype.to_real() if dtype.is_complex else dtype
    parts = 2 if dtype.is_complex else 1
    ints = torch.zeros(n * parts, dtype=_INTS[torch.empty((), dtype=real).element_size()])
    ints[at * parts] = 8
    g = ints.view(real)
    return torch.view_as_complex(g.view(n, 2)) if dtype.is_complex else g


@pytest.mark.parametrize("dtype", SUBNORMAL_DTYPES, ids=str)
def test_a_subnormal_only_grad_has_one_verdict_wherever_it_sits(dtype: torch.dtype, flush: bool) -> None:
    """The verdict is torch's own comparison with zero under the current setting: with
    denormals flushed a subnormal compares equal to zero (float16 is not flushed by torch's
    CPU kernels), and the grad is then inactive whether the subnormal comes first or last."""
    verdicts = []
    for at in (0, 2, 4):
        g = _subnormal_grad(dtype, at)
        torchs = bool(g.ne(0).any())
        assert _rule.nonzero_flags([g]) == [torchs], (at, flush)
        p = nn.Parameter(torch.ones(5, dtype=dtype))
        opt = safeopt.Adam([p], lr=0.1)
        p.grad = g
        opt.step()
        assert float(opt.state[p]["step"]) == float(torchs), (at, flush)
        verdicts.append(torchs)
    assert len(set(verdicts)) == 1
    if not flush or dtype is torch.float16:
        assert verdicts == [True] * 3


def test_flush_fixture_restores_the_setting() -> None:
    assert not _flushing()


# -- the fast path --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(_rule._PROBE), ids=str)
def test_the_probe_agrees_with_the_full_check_on_single_elements(dtype: torch.dtype) -> None:
    """Every class of first element (zero, -0.0, subnormal, normal, inf, NaN) in a dense grad
    that is otherwise zero: the probe only ever proves nonzero what the full check finds nonzero."""
    real = dtype.to_real() if dtype.is_complex else dtype
    info = torch.finfo(real)
    for value in (
        0.0,
        -0.0,
        info.smallest_normal / 4,
        -info.smallest_normal / 4,
        1.0,
        -2.5,
        float("inf"),
        float("nan"),
    ):
        for imag in (0.0, value) if dtype.is_complex else (0.0,):
            g = torch.zeros(4, dtype=dtype)
            g[0] = complex(value, imag) if dtype.is_complex else value
            full = _rule._full_flags([g])[0]
            if _rule._surely_nonzero(g):
                assert full, (value, imag)
            assert _rule.nonzero_flags([g]) == [full]
