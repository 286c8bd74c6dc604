"""DDP on CPU (gloo, two processes on loopback): idle branches stay put on every rank; ranks agree."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

SCRIPT = Path(__file__).parent / "scripts" / "ddp_worker.py"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tmp_path: Path, *extra: str, world: int = 2) -> list[dict]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    outs = [tmp_path / f"rank{r}{''.join(extra)}.pt" for r in range(world)]
    procs = [
        subprocess.Popen([sys.executable, str(SCRIPT), str(r), str(world), str(port), str(outs[r]), *extra], env=env)
        for r in range(world)
    ]
    try:
        codes = [p.wait(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [0] * world
    return [torch.load(o, weights_only=True) for o in outs]


needs_gloo = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


@needs_gloo
def test_ddp_alternating_branches_torch_moves_the_idle_branch(tmp_path: Path) -> None:
    for r in run_ranks(tmp_path, "torch"):
        assert not all(r["stayed"][1:]), r["stayed"]


@needs_gloo
def test_ddp_alternating_branches_find_unused_parameters(tmp_path: Path) -> None:
    results = run_ranks(tmp_path)
    for r in results:
        assert r["stayed"] == [True] * 6, r["stayed"]  # torch.optim.Adam moves them from step 2 on
    first = results[0]
    for other in results[1:]:
        for key, value in first["params"].items():
            assert torch.equal(value, other["params"][key]), key
        assert first["steps"] == other["steps"]
    assert sorted(first["steps"].values()) == [3.0, 3.0, 3.0, 3.0]  # each branch took part in 3 of 6 steps
