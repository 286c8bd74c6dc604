"""A run killed with SIGKILL and resumed from its last checkpoint ends bit-identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "train_ckpt.py"
ROOT = Path(__file__).resolve().parents[1]
STEPS = 12


def run(checkpoint: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(checkpoint), str(STEPS), *extra],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path: Path) -> None:
    whole = tmp_path / "whole.pt"
    assert run(whole).wait(timeout=120) == 0

    crashed = tmp_path / "crashed.pt"
    proc = run(crashed, "--slow")
    assert proc.stdout is not None
    for line in proc.stdout:  # kill it once it is past the freeze, mid-run
        if int(line) == 7:
            break
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert torch.load(crashed, weights_only=True)["step"] < STEPS

    assert run(crashed).wait(timeout=120) == 0
    a, b = torch.load(whole, weights_only=True), torch.load(crashed, weights_only=True)
    assert a["step"] == b["step"] == STEPS
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["opt"]["param_groups"] == b["opt"]["param_groups"]
    assert b["opt"]["param_groups"][1]["frozen"] is True
    for index, state in a["opt"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["opt"]["state"][index][name]), (index, name)
