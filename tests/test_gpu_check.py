"""The prepared GPU script runs its benchmark logic here too (tiny shapes, the CPU), so the one
run on a lent GPU does not fail on a typo. No timing is asserted: only what it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_writes_its_results(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--bench-only"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "gpu_check-smoke.json").read_text())
    rows = result["rows"]
    impls = {row["impl"] for row in rows}
    assert {"fused", "fused+capturable"} <= impls
    assert {row["idle_tensors"] for row in rows} == {0, 12}  # all active; the last of 2 blocks (12 tensors)
    assert all(row["torch_ms"] > 0 and row["safeopt_ms"] > 0 and row["ratio"] > 0 for row in rows)
    for row in rows:  # the launch count beside the times: the capturable step at its floor
        assert row["torch_launches"] > 0 and row["safeopt_launches"] > 0
        if row["impl"] == "fused+capturable":
            assert row["safeopt_reads"] == 0
            assert row["safeopt_launches"] <= row["torch_launches"] + result["tensors"] + 8
    table = (tmp_path / "gpu_check-smoke.md").read_text()
    assert table.count("\n| ") == len(rows) + 1  # header and one line a row
