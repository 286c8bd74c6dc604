"""safeopt.bench and ``python -m safeopt bench``: real measurements, checked for structure only.

No timing is asserted (timings are the benchmark's business): only that both optimizers were
timed over the rounds asked for, that the safeopt side is the right optimizer, and that the
model's own parameters and grads are left as they were.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import safeopt
from safeopt import _bench
from safeopt.__main__ import main

FAST = {"rounds": 2, "min_run_time": 0.02, "verbose": False}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


def test_bench_times_both_sides_for_every_idle_fraction_and_leaves_the_model_alone() -> None:
    net = model()
    net[0].weight.grad = torch.ones(8, 8)
    before = [p.detach().clone() for p in net.parameters()]
    report = safeopt.bench(
        net, lambda ps: torch.optim.AdamW(ps, lr=0.1, foreach=True), idle=[0.0, 0.5, 1.0], **FAST
    )
    assert [r.idle for r in report.rows] == [0.0, 0.5, 1.0]
    for r in report.rows:
        assert r.idle_by == "zero" and r.torch_ms > 0 and r.safeopt_ms > 0 and r.ratio > 0
        assert len(r.torch.times) == len(r.safeopt.times) == 2  # one time per round
        assert r.torch.description == "torch" and r.safeopt.description == "safeopt"
        assert r.extra_mb_torch is not None and r.extra_mb_torch >= 0
        assert r.extra_mb_safeopt is not None and r.extra_mb_safeopt >= 0
        assert r.syncs_torch is None and r.syncs_safeopt is None  # counted on CUDA only
        assert r.launches_torch is not None and r.launches_torch.launches > 0
        assert r.launches_safeopt is not None and r.launches_safeopt.reads >= 0
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert torch.equal(net[0].weight.grad, torch.ones(8, 8)) and net[2].weight.grad is None
    text = str(report)
    assert "torch" in text and "safeopt" in text and "safeopt/torch" in text and "launches/reads" in text
    assert "AdamW foreach, 50% idle (zero)" in text


def test_bench_takes_parameters_and_a_safeopt_side_of_your_choosing() -> None:
    built: list[torch.optim.Optimizer] = []

    def safe(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        built.append(safeopt.SGD(params, lr=0.1, lazy=False))
        return built[-1]

    params = [nn.Parameter(torch.randn(4, 4)) for _ in range(3)]
    report = safeopt.bench(
        params,
        lambda ps: torch.optim.SGD(ps, lr=0.1),
        idle=0.5,
        idle_by="freeze",
        safe_optimizer=safe,
        memory=False,
        **FAST,
    )
    (row,) = report.rows
    assert row.idle_by == "freeze" and row.extra_mb_torch is None
    (opt,) = built
    assert opt.is_frozen(opt.param_groups[0]["params"][-1])  # the last tensors, half the elements
    assert not opt.is_frozen(opt.param_groups[0]["params"][0])
    assert all(p.grad is None for p in params)


def test_rows_cycles_grads_with_different_active_rows() -> None:
    table = nn.Parameter(torch.randn(100, 4))
    report = safeopt.bench(
        [table], lambda ps: torch.optim.Adam(ps, lr=0.1), idle=0.9, idle_by="rows", memory=False, **FAST
    )
    assert report.rows[0].idle_by == "rows"
    grads = _bench._grads([table], 0.9, "rows")
    assert len(grads) == 3
    active = [set(g.ne(0).any(1).nonzero().flatten().tolist()) for (g,) in grads]
    assert all(len(a) == 10 for a in active) and len(set(map(frozenset, active))) > 1


def test_the_safeopt_side_is_the_twin_with_the_same_groups_else_wrap() -> None:
    params = [nn.Parameter(torch.randn(3)) for _ in range(2)]
    ref = torch.optim.AdamW([{"params": params[:1], "lr": 0.5}, {"params": params[1:]}], lr=0.1, foreach=True)
    twin = _bench._twin(ref, True)
    assert type(twin) is safeopt.AdamW
    assert [g["lr"] for g in twin.param_groups] == [0.5, 0.1] and twin.defaults["foreach"] is True
    assert twin.param_groups[0]["params"][0] is params[0]
    assert type(_bench._twin(ref, "rows")) is safeopt.AdamW
    wrapped = _bench._twin(torch.optim.RMSprop(params, lr=0.1), True)
    assert isinstance(wrapped, safeopt.LazyWrapper)
    with pytest.raises(ValueError, match="safe_optimizer"):
        _bench._twin(torch.optim.RMSprop(params, lr=0.1), "rows")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"idle": 1.5}, "Invalid idle fraction"),
        ({"idle_by": "none"}, "Invalid idle_by"),
        ({"rounds": 0}, "Invalid rounds"),
    ],
)
def test_bench_rejects_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        safeopt.bench(model(), lambda ps: torch.optim.SGD(ps, lr=0.1), **kwargs)


def test_bench_needs_a_trainable_parameter() -> None:
    with pytest.raises(ValueError, match="requires_grad"):
        safeopt.bench(model().requires_grad_(False), lambda ps: torch.optim.SGD(ps, lr=0.1))


def test_the_command_prints_the_comparison(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "bench",
        "--tensors",
        "3x8",
        "--tensors",
        "2x4x4",
        "--optimizer",
        "SGD(lr=0.1, momentum=0.9)",
        "--idle",
        "0",
        "0.5",
        "--rounds",
        "2",
        "--min-run-time",
        "0.02",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "5 tensors, 5.6e-05M elements" in out
    assert "SGD, 0% idle (zero)" in out and "SGD, 50% idle (zero)" in out and "safeopt/torch" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--optimizer", "AdamW(1e-3)"],
        ["--optimizer", "NoSuchOptimizer"],
        ["--optimizer", "AdamW(lr=x)"],
        ["--tensors", "100"],
        ["--tensors", "0x5"],
        ["--model", "no_colon"],
    ],
)
def test_the_command_rejects_bad_specs(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", *argv])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are counted on CUDA only")
def test_host_syncs_are_counted_on_cuda() -> None:
    net = model().cuda()
    report = safeopt.bench(net, lambda ps: torch.optim.Adam(ps, lr=0.1, fused=True), idle=[0.0, 0.5], **FAST)
    for r in report.rows:
        assert isinstance(r.syncs_torch, int) and isinstance(r.syncs_safeopt, int)
    assert report.rows[0].syncs_torch == 0  # torch's fused step itself does not sync
