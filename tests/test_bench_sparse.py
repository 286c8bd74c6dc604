"""benchmarks/bench_sparse.py: it steps what it says on the same grads, and the committed table
comes from the committed JSON. No timing is asserted (timings are the benchmark's business)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_sparse", ROOT / "benchmarks" / "bench_sparse.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_sparse"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_sparse", None)


def test_a_small_run_measures_every_optimizer_on_the_same_grads(bench, tmp_path: Path) -> None:
    args = [
        "--table-rows",
        "3000",
        "--rounds",
        "2",
        "--min-run-time",
        "0.01",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert bench.main(args) == 0
    saved = json.loads((tmp_path / "sparse.json").read_text())
    assert saved["meta"]["table"] == [3000, 64] and saved["meta"]["touched_rows"] == 30
    names = [row["optimizer"] for row in saved["rows"]]
    assert names == [bench.DENSE, bench.SPARSE_ADAM, bench.ROWS, bench.ROWS_MORE, bench.ROWS_DENSE]
    by_name = {row["optimizer"]: row for row in saved["rows"]}
    assert [r["vs"] for r in by_name[bench.ROWS]["ratios"]] == [bench.DENSE, bench.SPARSE_ADAM]
    assert by_name[bench.ROWS]["state_mb"] > by_name[bench.SPARSE_ADAM]["state_mb"]  # row_step
    assert (tmp_path / "sparse.md").read_text() == bench.markdown(saved)


def test_the_steppers_stay_on_the_same_table(bench) -> None:
    """Every optimizer's table starts equal and each row moves only when a grad names it."""
    grads = bench.make_grads(50, 4, 5, 3)
    start = torch.randn(50, 4)
    dense = [g.coalesce().to_dense() for g in grads]
    steppers = [bench.Stepper(name, start, grads, dense) for name in (bench.SPARSE_ADAM, bench.ROWS)]
    named = set()
    for stepper in steppers:
        for _ in grads:
            stepper.step()
    for g in grads:
        named |= set(g.coalesce().indices()[0].tolist())
    for stepper in steppers:
        moved = {r for r in range(50) if not torch.equal(stepper.table[r], start[r])}
        assert moved == named, stepper.name


def test_committed_table_is_generated_from_the_committed_json(bench, tmp_path: Path) -> None:
    out = tmp_path / "results"
    out.mkdir()
    shutil.copy(RESULTS / "sparse.json", out / "sparse.json")
    assert bench.main(["--replot", "--out", str(out)]) == 0
    assert (out / "sparse.md").read_text() == (RESULTS / "sparse.md").read_text()
    saved = json.loads((RESULTS / "sparse.json").read_text())
    assert saved["meta"]["quick"] is False and saved["meta"]["table"] == [1_000_000, 64]
