"""Every script in examples/ runs as a user would run it, and its own checks pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_there_is_an_example_for_every_recipe() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {
        "gan_alternating",
        "freeze_branches",
        "progressive_unfreezing",
        "cuda_graphs_static_grads",
        "moe_idle_experts",
        "embedding_rows",
    } <= names
    recipes = (ROOT / "docs" / "recipes.md").read_text()
    for path in EXAMPLES:
        assert f"examples/{path.name}" in recipes, f"docs/recipes.md does not mention examples/{path.name}"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, str(path)],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip(), "an example says what it showed"
