"""torch.distributed on CPU: FSDP2, DDP with alternating or split branches, DCP resume across processes.

Each test starts two processes itself (gloo, loopback, a free port from a socket bound to port 0)
running tests/scripts/dist_worker.py, waits with a timeout, and compares what the ranks wrote
with torch.equal. Single-process DCP is in test_dcp.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import cases

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "scripts" / "dist_worker.py"
WORLD = 2
TIMEOUT = 150  # seconds for a whole launch; a hang fails the test instead of blocking CI

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(rank: int, port: int) -> dict[str, str]:
    """The environment torchrun would give ``rank`` of WORLD on loopback, safeopt importable."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(WORLD),
        "LOCAL_WORLD_SIZE": str(WORLD),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }


def wait_ranks(procs: list[tuple[subprocess.Popen[bytes], Any]]) -> list[int | str]:
    """Each rank's exit code, or "timeout" (then the rest are not waited for); every process is
    killed if still running and every log closed, whatever happens."""
    codes: list[int | str] = []
    try:
        for proc, _ in procs:
            try:
                codes.append(proc.wait(timeout=TIMEOUT))
            except subprocess.TimeoutExpired:
                codes.append("timeout")
                break
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    return codes


def launch(scenario: str, out: Path, *extra: str) -> list[dict[str, Any]]:
    """Run ``scenario`` on WORLD ranks; return what each rank saved, in rank order."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(WORLD):
        env = rank_env(rank, port)
        log = open(out / f"{scenario}-rank{rank}.log", "w")  # noqa: SIM115 - closed below
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, str(WORKER), scenario, str(out), *extra],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    codes = wait_ranks(procs)
    if codes != [0] * WORLD:
        logs = "\n".join(
            f"--- rank {r} ---\n" + (out / f"{scenario}-rank{r}.log").read_text()[-4000:]
            for r in range(WORLD)
        )
        pytest.fail(f"{scenario}: exit codes {codes}\n{logs}")
    return [torch.load(out / f"{scenario}-rank{r}.pt", weights_only=False) for r in range(WORLD)]


def same(a: Any, b: Any) -> bool:
    """Bit-identity of nested snapshots (dicts, lists, tensors, plain values)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def steps_of(snap: dict[str, Any], name: str) -> int:
    state = snap["state"][name]
    return int(state["step"]) if "step" in state else 0


# --- FSDP2 ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if cases.FSDP2_ON_CPU:
        pytest.skip(cases.FSDP2_ON_CPU)
    return launch("fsdp", tmp_path_factory.mktemp("fsdp"))


def test_fsdp2_runs_on_cpu_and_shards_the_parameters(fsdp_runs: list[dict[str, Any]]) -> None:
    for rank, run in enumerate(fsdp_runs):
        weight = run["safeopt"][0]["params"]["emb.weight"]
        assert weight.shape == (4, 4), f"rank {rank} should hold half of the 8 embedding rows"
    assert not torch.equal(
        fsdp_runs[0]["safeopt"][0]["params"]["emb.weight"], fsdp_runs[1]["safeopt"][0]["params"]["emb.weight"]
    )


def test_fsdp2_active_parameters_match_torch_on_every_rank(fsdp_runs: list[dict[str, Any]]) -> None:
    """Dense layers have a nonzero gradient in every shard: safeopt steps them exactly as torch."""
    for rank, run in enumerate(fsdp_runs):
        for step, (mine, theirs) in enumerate(zip(run["safeopt"], run["torch"])):
            for name in ["dense.weight", "dense.bias", "head.weight", "head.bias"]:
                assert torch.equal(mine["params"][name], theirs["params"][name]), (rank, step, name)
                assert same(mine["state"][name], theirs["state"][name]), (rank, step, name)
        assert steps_of(run["safeopt"][-1], "dense.weight") == 3


def test_fsdp2_all_zero_gradient_is_skipped_on_every_rank(fsdp_runs: list[dict[str, Any]]) -> None:
    """``ghost`` is in the graph with a gradient of zeros in every shard: no rank moves it."""
    for rank, run in enumerate(fsdp_runs):
        start, end = run["safeopt"][0], run["safeopt"][-1]
        for name in ["ghost.weight", "ghost.bias"]:
            assert torch.equal(start["params"][name], end["params"][name]), (rank, name)
            assert steps_of(end, name) == 0, (rank, name)
            # torch.optim.Adam decays it: the check is not vacuous
            assert not torch.equal(run["torch"][0]["params"][name], run["torch"][-1]["params"][name]), (
                rank,
                name,
            )


def test_fsdp2_decision_is_the_same_on_every_rank(fsdp_runs: list[dict[str, Any]]) -> None:
    """Only rows 0-3 of the embedding are used, all on rank 0's shard: the parameter as a whole
    has a nonzero gradient, so every rank must step its shard (step counts agree) exactly as torch."""
    counts = [[steps_of(snap, "emb.weight") for snap in run["safeopt"]] for run in fsdp_runs]
    assert counts[0] == counts[1], f"step counts per rank disagree: {counts}"
    assert counts[0] == [0, 1, 2, 3]
    for rank, run in enumerate(fsdp_runs):
        assert torch.equal(
            run["safeopt"][-1]["params"]["emb.weight"], run["torch"][-1]["params"]["emb.weight"]
        ), rank


def test_fsdp2_with_lazy_false_and_explicit_freezes_agrees_on_every_rank(
    fsdp_runs: list[dict[str, Any]],
) -> None:
    """lazy=False leaves only None grads and freeze flags to decide, both the same on every rank:
    the embedding steps everywhere exactly as torch, the frozen layer holds still everywhere."""
    for rank, run in enumerate(fsdp_runs):
        for step, (mine, theirs) in enumerate(zip(run["lazy_false"], run["torch"])):
            for name in ["emb.weight", "dense.weight", "dense.bias", "head.weight", "head.bias"]:
                assert torch.equal(mine["params"][name], theirs["params"][name]), (rank, step, name)
                assert same(mine["state"][name], theirs["state"][name]), (rank, step, name)
            for name in ["ghost.weight", "ghost.bias"]:
                assert torch.equal(mine["params"][name], run["lazy_false"][0]["params"][name]), (rank, name)
        assert steps_of(run["lazy_false"][-1], "emb.weight") == 3


def test_dtensor_zero_check_is_collective(tmp_path: Path) -> None:
    """The zero check of a DTensor grad reads every rank's shard: the same answer on every rank,
    nonzero when any shard is, and a pending sum (Partial) decided on its sum, not its parts."""
    sys.path.insert(0, str(WORKER.parent))
    try:
        from dist_worker import FLAG_CASES
    finally:
        sys.path.remove(str(WORKER.parent))
    expected = {name: flag for name, (_, _, flag) in FLAG_CASES.items()}
    for rank, result in enumerate(launch("flags", tmp_path)):
        assert result["flags"] == expected, rank
        assert result["mixed"] == [False, True, True, False], rank


# --- DDP: each rank its own branch ------------------------------------------------------------------

DDP_PLAN = [("left", "left"), ("left", "right"), ("right", "right"), ("right", "left"), ("left", "left")]


def test_ddp_alternating_branches_torch_moves_the_idle_branch(tmp_path: Path) -> None:
    for rank in launch("ddp_alternating", tmp_path, "torch"):
        assert not all(rank["stayed"][1:]), rank["stayed"]  # torch.optim.Adam moves it from step 2 on


def test_ddp_alternating_branches_find_unused_parameters(tmp_path: Path) -> None:
    ranks = launch("ddp_alternating", tmp_path, "safeopt")
    for rank in ranks:
        assert rank["stayed"] == [True] * 6, rank["stayed"]
    first = ranks[0]
    for other in ranks[1:]:
        for key, value in first["params"].items():
            assert torch.equal(value, other["params"][key]), key
        assert first["steps"] == other["steps"]
    assert sorted(first["steps"]) == [3.0, 3.0, 3.0, 3.0]  # each branch took part in 3 of 6 steps


def test_ddp_decides_on_the_all_reduced_grads(tmp_path: Path) -> None:
    """A branch used by one rank only still has a nonzero all-reduced grad on both: both step it.
    A branch no rank used stays bit-identical on both. The ranks stay identical throughout."""
    ranks = [r["history"] for r in launch("ddp_split", tmp_path)]
    for step, used in enumerate(DDP_PLAN, start=1):
        before, after = ranks[0][step - 1], ranks[0][step]
        for branch in ("left", "right"):
            moved = not torch.equal(before["params"][f"{branch}.weight"], after["params"][f"{branch}.weight"])
            assert moved == (branch in used), (step, branch, used)
        for r in range(1, WORLD):
            assert same(ranks[r][step], ranks[0][step]), f"rank {r} differs from rank 0 after step {step}"
    final = ranks[0][-1]
    assert steps_of(final, "left.weight") == 4 and steps_of(final, "right.weight") == 3


# --- torch.distributed.checkpoint with FSDP2 ---------------------------------------------------------


def test_dcp_resume_in_new_processes_is_bit_identical(tmp_path: Path) -> None:
    """Save at step 3 with dcp.save(get_state_dict(...)); new processes load through set_state_dict
    and finish: shards, optimizer state and freeze flags equal the uninterrupted run on each rank."""
    if cases.FSDP2_ON_CPU:
        pytest.skip(cases.FSDP2_ON_CPU)
    checkpoint = str(tmp_path / "checkpoint")
    first = launch("dcp_first", tmp_path / "first", checkpoint)
    second = launch("dcp_resume", tmp_path / "second", checkpoint)
    for rank in range(WORLD):
        saved, whole = first[rank]["saved"], first[rank]["whole"]
        untouched, loaded, resumed = (
            second[rank]["untouched"],
            second[rank]["loaded"],
            second[rank]["resumed"],
        )
        assert untouched["groups"][1]["frozen_params"] == [] and loaded["groups"][1]["frozen_params"] == [1]
        assert same(loaded, saved), f"rank {rank}: what was loaded is not what was saved"
        assert resumed["groups"][0]["frozen"] is True  # frozen after the resume, in the resumed run
        assert same(resumed, whole), f"rank {rank}: the resumed run differs from the uninterrupted one"
    # Not vacuous: the frozen bias held still while the rest of its group trained, on both ranks.
    for rank in range(WORLD):
        assert torch.equal(
            first[rank]["whole"]["params"]["mid.bias"], second[rank]["untouched"]["params"]["mid.bias"]
        )
        assert not torch.equal(
            first[rank]["whole"]["params"]["mid.weight"], second[rank]["untouched"]["params"]["mid.weight"]
        )


def test_dcp_resume_of_sgd_rmsprop_adagrad_in_new_processes_is_bit_identical(tmp_path: Path) -> None:
    """Issue 25.1: SGD's momentum buffers (plain, nesterov, wrap()), RMSprop's and Adagrad's
    state come back through dcp.load on both ranks, and the frozen bias, unfrozen after the
    resume, starts from torch's first step: the resumed runs equal the uninterrupted ones."""
    if cases.FSDP2_ON_CPU:
        pytest.skip(cases.FSDP2_ON_CPU)
    checkpoint = str(tmp_path / "checkpoint")
    first = launch("dcp_optimizers_first", tmp_path / "first", checkpoint)
    second = launch("dcp_optimizers_resume", tmp_path / "second", checkpoint)
    for rank in range(WORLD):
        assert first[rank].keys() == second[rank].keys()
        for name in first[rank]:
            saved, whole = first[rank][name]["saved"], first[rank][name]["whole"]
            loaded, resumed = second[rank][name]["loaded"], second[rank][name]["resumed"]
            assert same(loaded, saved), f"{name}, rank {rank}: what was loaded is not what was saved"
            assert same(resumed, whole), f"{name}, rank {rank}: the resumed run differs"
            # The bias was frozen at the save: its state is fresh (SGD: no buffer; the others: step 0).
            bias = saved["state"]["mid.bias"]
            assert (not bias) if "SGD" in name else float(bias["step"]) == 0, name
            assert whole["state"]["mid.bias"], name  # and it has state after its first update
