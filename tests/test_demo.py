"""The README's main command: the demo shows torch's drift and none from safeopt."""

from __future__ import annotations

import subprocess
import sys

import pytest

from safeopt.__main__ import SCENARIOS, main


def test_demo_reports_drift_under_torch_and_none_under_safeopt(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for name in SCENARIOS:
        line = next(line for line in out.splitlines() if line.startswith(name))
        _, _, t2, _, tmax, s2, _, smax = line[len(name) :].split()
        t2, tmax, s2, smax = map(float, (t2, tmax, s2, smax))
        assert t2 > 0 and tmax > 0, line
        assert s2 == 0 and smax == 0, line


def test_module_entry_point_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "safeopt", "demo"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "safeopt" in done.stdout
