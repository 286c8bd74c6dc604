"""The benchmark harness: it measures what it says, and the committed tables come from the committed JSON.

No timing is asserted here (timings are the benchmark's business, not a test's): only that the
harness runs its A/B rounds on real optimizers and that what it writes is consistent.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "benchmarks" / "bench_step.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_step"] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_step", None)


@pytest.mark.parametrize("how", ["zero grads", "freeze"])
def test_measure_runs_both_optimizers_and_releases_the_grads(bench, how: str) -> None:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(100)) for _ in range(4)]
    idle = bench._inactive(params, 0.5)
    assert len(idle) == 2
    row = bench.measure("cpu", "test", "Adam", "foreach", how, 0.5, params, rounds=3, steps=2)
    assert row.workload == "test" and row.how == how and row.active == 0.5
    assert row.torch_ms > 0 and row.safeopt_ms > 0 and row.ratio > 0
    assert all(p.grad is None for p in params)  # grads released after measuring


def test_committed_tables_are_generated_from_the_committed_json(bench, tmp_path: Path) -> None:
    out = tmp_path / "results"
    shutil.copytree(RESULTS, out)
    assert bench.main(["--replot", "--out", str(out)]) == 0
    for name in ("results.md", "rows.md"):
        assert (out / name).read_text() == (RESULTS / name).read_text(), f"{name} does not match its JSON"
    saved = json.loads((RESULTS / "results.json").read_text())
    assert saved["meta"]["quick"] is False, "the committed results are a quick run"
    workloads = {r["workload"] for r in saved["rows"]}
    assert workloads == set(bench.WORKLOADS), "the committed results miss a workload"
    rows = json.loads((RESULTS / "rows.json").read_text())
    assert rows["meta"]["quick"] is False and {r["workload"] for r in rows["rows"]} == set(
        bench.ROWS_WORKLOADS
    )
