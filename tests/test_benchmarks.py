"""The benchmark suites: they measure what they say, and the committed tables come from the committed JSON.

No timing is asserted here (timings are the benchmark's business, not a test's): only that a
suite's rows come from real ``safeopt.bench`` measurements and that what it writes is consistent.
"""

from __future__ import annotations

import ast
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import safeopt

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SUITES = ("overhead", "idle", "rows", "moe")


@pytest.fixture(scope="module")
def bench():
    """The benchmarks package (catalogue and report), imported as the scripts import it."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import catalogue, report

        yield catalogue, report
    finally:
        sys.path.remove(str(ROOT))


def test_a_row_is_a_real_measurement_and_its_table_says_so(bench, tmp_path: Path) -> None:
    catalogue, report = bench
    params = [nn.Parameter(torch.randn(50)) for _ in range(4)]
    result = safeopt.bench(
        params,
        catalogue.optimizer("Adam", "foreach"),
        idle=[0.5],
        idle_by="freeze",
        rounds=2,
        min_run_time=0.02,
        verbose=False,
    )
    (row,) = [report.Row.of(r, "cpu", "test", "Adam", "foreach") for r in result.rows]
    assert (
        row.how == "freeze"
        and row.active == 0.5
        and row.torch_ms > 0
        and row.safeopt_ms > 0
        and row.ratio > 0
    )
    info = report.meta(["cpu"], True, 2, 1.0, ["test"])
    path = report.save(tmp_path, "idle", [row], info)
    assert path.name == "idle-quick.json"  # a quick run never overwrites the full results
    table = path.with_suffix(".md").read_text()
    assert "| cpu | test | Adam | foreach | freeze | 50% |" in table and f"**{row.ratio:.2f}**" in table


def test_committed_tables_are_generated_from_the_committed_json(bench, tmp_path: Path) -> None:
    catalogue, report = bench
    out = tmp_path / "results"
    shutil.copytree(RESULTS, out)
    assert {p.stem for p in report.replot(out)} == set(SUITES)
    for suite in SUITES:
        name = f"{suite}.md"
        assert (out / name).read_text() == (RESULTS / name).read_text(), f"{name} does not match its JSON"
        saved = json.loads((RESULTS / f"{suite}.json").read_text())
        assert saved["meta"]["quick"] is False, f"the committed {suite} results are a quick run"
        workloads = {r["workload"] for r in saved["rows"]}
        known = {"rows": catalogue.ROW_WORKLOADS, "moe": catalogue.MOE_WORKLOADS}.get(
            suite, catalogue.WORKLOADS
        )
        assert workloads == set(saved["meta"]["workloads"]) <= set(known), (
            f"the {suite} results miss a workload"
        )


@pytest.mark.parametrize("script", sorted((ROOT / "benchmarks").glob("bench_*.py")), ids=lambda p: p.name)
def test_every_script_says_how_to_run_it(script: Path) -> None:
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    assert "Usage:" in doc and f"python benchmarks/{script.name}" in doc
