"""safeopt.watch never communicates and holds no more than it says; bench's arguments are checked
before any work (issue 25, items 3, 5 and 6).

The distributed test starts two gloo processes (tests/scripts/watch_worker.py) in which only
rank 0 watches an FSDP2 job; memory is counted by tracking every tensor an operation creates
(weak references, not timing).
"""

from __future__ import annotations

import os
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import cases
import safeopt

WORKER = Path(__file__).parent / "scripts" / "watch_worker.py"
TIMEOUT = 120  # seconds for both ranks; the worker's process group gives up after 20


# --- item 3: no collective -------------------------------------------------------------------------


def _launch(tmp_path: Path, watchers: str) -> list[dict[str, Any]]:
    from test_distributed import WORLD, free_port, rank_env, wait_ranks

    port = free_port()
    procs = []
    for rank in range(WORLD):
        log = open(tmp_path / f"watch-rank{rank}.log", "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(tmp_path), watchers],
            env=rank_env(rank, port),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append((proc, log))
    codes = wait_ranks(procs)
    logs = "\n".join(
        f"--- rank {r} ---\n" + (tmp_path / f"watch-rank{r}.log").read_text()[-3000:] for r in range(WORLD)
    )
    assert codes == [0] * WORLD, f"exit codes {codes}\n{logs}"
    return [torch.load(tmp_path / f"watch-rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)
@pytest.mark.parametrize("watchers", ["0", "0,1"])
def test_watch_on_some_ranks_of_an_fsdp2_job_decides_from_the_local_shard(
    tmp_path: Path, watchers: str
) -> None:
    if cases.FSDP2_ON_CPU:
        pytest.skip(cases.FSDP2_ON_CPU)
    runs = _launch(tmp_path, watchers)
    assert [r["watched"] for r in runs] == [True, watchers == "0,1"]
    for rank, run in enumerate(runs):
        if not run["watched"]:
            continue
        assert run["steps"] == 3
        # The layer scaled by 0 has no gradient on any rank, and torch's weight decay moves it.
        assert run["idle"]["ghost.weight"] == run["moved"]["ghost.weight"] == 3, rank
        assert run["shapes"]["ghost.weight"] == (4, 4)  # the parameter's shape, not the shard's
        # Only rows 0-3 of emb are looked up: rank 0's shard has a gradient, rank 1's has none.
        if rank == 0:
            assert "emb.weight" not in run["idle"]
            assert "dense.weight" not in run["idle"]
        else:
            assert run["idle"]["emb.weight"] == run["moved"]["emb.weight"] == 3


# --- item 5: memory ------------------------------------------------------------------------------


class LiveTensors(TorchDispatchMode):
    """Every tensor an operation creates (not a view or the result of an in-place operation), kept
    track of with a weak reference: the bytes alive now and at most, and how many are alive."""

    def __init__(self) -> None:
        super().__init__()
        self.alive: dict[int, int] = {}  # storage address -> bytes
        self.peak = 0

    def _free(self, ptr: int) -> None:
        self.alive.pop(ptr, None)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            a.untyped_storage().data_ptr()
            for a in [*args, *(kwargs or {}).values()]
            if isinstance(a, Tensor) and a.layout is torch.strided
        }
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(t, Tensor) or t.layout is not torch.strided:
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in inputs or ptr in self.alive or not t.untyped_storage().nbytes():
                continue
            self.alive[ptr] = t.untyped_storage().nbytes()
            weakref.finalize(t, self._free, ptr)
            self.peak = max(self.peak, sum(self.alive.values()))
        return out

    @property
    def bytes(self) -> int:
        return sum(self.alive.values())


N = 1 << 16  # elements of the watched parameter


def _idle_sgd() -> tuple[nn.Parameter, torch.optim.Optimizer]:
    """A float32 parameter that torch's SGD moves without a gradient (momentum), in place only."""
    p = nn.Parameter(torch.randn(N))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, foreach=False)
    p.grad = torch.randn(N)
    opt.step()  # the momentum buffer exists before anything is counted
    p.grad.zero_()
    return p, opt


def test_watch_holds_a_copy_and_the_drift_at_most() -> None:
    p, opt = _idle_sgd()
    w = safeopt.watch(opt)
    live = LiveTensors()
    with live:
        for _ in range(3):
            opt.step()
    report = w.report()
    assert report.params[0].moved_steps == 3
    size = p.numel() * p.element_size()
    # Between steps: the drift alone. During a step: the copy and the drift, and while a moved
    # parameter is compared, byte masks of its shape (at most three).
    assert live.bytes == size
    assert live.peak <= 2 * size + 3 * p.numel(), live.peak / size


def test_the_copies_of_a_step_that_raised_are_dropped_by_remove() -> None:
    p, opt = _idle_sgd()
    live = LiveTensors()
    with live:
        w = safeopt.watch(opt)
        opt.param_groups[0]["lr"] = "not a number"
        with pytest.raises(TypeError):
            opt.step()
        assert live.bytes == p.numel() * 4  # the copy of the failed step, until ...
        w.remove()
        assert live.bytes == 0  # ... the hooks come off
    assert w.report().steps == 0


def test_leaving_a_with_block_by_an_exception_drops_the_copies() -> None:
    _, opt = _idle_sgd()
    opt.param_groups[0]["lr"] = "not a number"
    live = LiveTensors()
    with live:
        with pytest.raises(TypeError), safeopt.watch(opt) as w:
            opt.step()
        assert live.bytes == 0
    assert repr(w).startswith("<safeopt.Watch of SGD, removed")


def test_the_next_step_drops_the_copies_of_a_step_that_raised() -> None:
    p, opt = _idle_sgd()
    w = safeopt.watch(opt)
    live = LiveTensors()
    with live:
        opt.param_groups[0]["lr"] = "not a number"
        with pytest.raises(TypeError):
            opt.step()
        opt.param_groups[0]["lr"] = 0.1
        opt.step()
        assert live.bytes == p.numel() * 4  # the drift of the step that ran, no copy
    assert w.report().steps == 1


# --- item 6: bench's arguments, checked before any work ---------------------------------------------


def test_bench_rejects_an_empty_list_of_idle_fractions() -> None:
    with pytest.raises(ValueError, match="Invalid idle: an empty list"):
        safeopt.bench(nn.Linear(2, 2), lambda ps: torch.optim.SGD(ps, lr=0.1), idle=[])


@pytest.mark.parametrize("idle", [1.5, -0.1, float("nan")])
def test_bench_rejects_an_idle_fraction_out_of_range(idle: float) -> None:
    with pytest.raises(ValueError, match="Invalid idle fraction"):
        safeopt.bench(nn.Linear(2, 2), lambda ps: torch.optim.SGD(ps, lr=0.1), idle=idle)


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from safeopt.__main__ import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--idle", "1.5"], "--idle"),
        (["--idle", "-0.1"], "--idle"),
        (["--idle", "nan"], "--idle"),
        (["--rounds", "0"], "--rounds"),
        (["--min-run-time", "0"], "--min-run-time"),
        (["--dtype", "nosuch"], "--dtype"),
        (["--dtype", "int64"], "--dtype"),  # randn cannot fill it
        (["--optimizer", "lr_scheduler"], "--optimizer"),
        (["--optimizer", "Optimizer"], "--optimizer"),
        (["--tensors", "99999999999999999999x1"], "--tensors"),
        (["--device", "nosuchdevice"], "--device"),
    ],
)
def test_the_command_rejects_bad_values_in_one_line_with_status_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str], option: str
) -> None:
    import safeopt.__main__ as cli

    def no_work(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("bench ran")

    monkeypatch.setattr(cli, "bench", no_work)  # a bad value must be found before any work
    code, _, err = _cli(["bench", *argv], capsys)
    assert code == 2, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"safeopt bench: error: argument {option}: "), err


def test_demo_reports_the_file_it_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    code, out, _ = _cli(["demo", "--out", str(tmp_path / "noext")], capsys)
    assert code == 0
    assert f"plot: {tmp_path / 'noext.png'}\n" in out
    assert (tmp_path / "noext.png").is_file() and not (tmp_path / "noext").exists()


@pytest.mark.parametrize("where", ["missing folder", "a folder", "read-only folder", "unknown extension"])
def test_demo_refuses_an_output_it_cannot_write_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    import safeopt._demo

    def no_work() -> None:
        raise AssertionError("the demo ran")

    monkeypatch.setattr(safeopt._demo, "run_all", no_work)
    out = {
        "missing folder": tmp_path / "nosuch" / "plot.png",
        "a folder": tmp_path,
        "read-only folder": tmp_path / "ro" / "plot.png",
        "unknown extension": tmp_path / "plot.nosuchformat",
    }[where]
    if where == "read-only folder":
        (tmp_path / "ro").mkdir(mode=0o555)
        if os.access(tmp_path / "ro", os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
    if where == "unknown extension":
        pytest.importorskip("matplotlib")
    code, _, err = _cli(["demo", "--out", str(out)], capsys)
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith("safeopt demo: error: argument --out: "), err
