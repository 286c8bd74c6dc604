"""The README's main command: the demo shows torch's drift and none from safeopt, and plots it."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from safeopt.__main__ import main
from safeopt._scenarios import SCENARIOS, Result, run_all

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results() -> list[Result]:
    return run_all()


def test_the_scenarios_people_hit_are_there() -> None:
    names = " ".join(s.name for s in SCENARIOS).lower()
    for word in ["branch", "detach", "momentum", "gan", "experts"]:
        assert word in names


@pytest.mark.parametrize("i", range(len(SCENARIOS)), ids=[s.name for s in SCENARIOS])
def test_torch_drifts_and_safeopt_does_not(results: list[Result], i: int) -> None:
    r = results[i]
    torch_report, safeopt_report = r.torch_report, r.safeopt_report
    assert torch_report and torch_report.l2 > 0 and torch_report.max_abs > 0
    assert len(torch_report.history) == len(safeopt_report.history) == r.scenario.steps
    assert not safeopt_report and safeopt_report.l2 == 0 and safeopt_report.max_abs == 0
    assert set(safeopt_report.history) == {0.0}
    # Both runs had the same parameters without a gradient: the comparison is like for like.
    assert {p.name for p in torch_report.params} == {p.name for p in safeopt_report.params}
    assert 0 < len(torch_report.params) <= r.n_params


def test_demo_prints_the_table_and_writes_the_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "plot.png"
    assert main(["demo", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for s in SCENARIOS:
        line = next(line for line in text.splitlines() if line.startswith(s.name))
        cells = line[len(s.name) :].split()
        assert cells[:2] == [s.optimizer, str(s.steps)]
        idle, total = map(int, cells[2].split("/"))
        assert 0 < idle <= total, line
        t_moved, t_l2, t_max, s_moved, s_l2, s_max = cells[3:]
        assert int(t_moved) > 0 and float(t_l2) > 0 and float(t_max) > 0, line
        assert int(s_moved) == 0 and float(s_l2) == 0 and float(s_max) == 0, line
    assert f"plot: {out}" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000


def test_the_module_runs_without_matplotlib_and_says_so(tmp_path: Path) -> None:
    blocker = tmp_path / "blocked"
    (blocker / "matplotlib").mkdir(parents=True)
    (blocker / "matplotlib" / "__init__.py").write_text(
        "raise ImportError('matplotlib blocked by the test')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, "-m", "safeopt", "demo"],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "plot skipped: matplotlib is not installed" in done.stdout
    assert "mixture of experts" in done.stdout
    assert not (tmp_path / "safeopt-demo.png").exists()


def test_the_console_script_is_the_demo_entry_point() -> None:
    try:
        dist = metadata.distribution("torch-safeopt")  # the distribution name; the import name is safeopt
    except metadata.PackageNotFoundError:
        pytest.skip("torch-safeopt is not installed (pip install -e .)")
    (script,) = [e for e in dist.entry_points if e.group == "console_scripts" and e.name == "safeopt"]
    assert script.load() is main
