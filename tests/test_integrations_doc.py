"""The complete recipes in docs/integrations.md run as they are written.

A recipe is a ```python block right after ``<!-- recipe: python -->`` (run in this process, in a
temporary directory) or ``<!-- recipe: torchrun -->`` (run on two gloo ranks, as torchrun would).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import cases
from test_clients import optional
from test_distributed import WORLD, free_port, rank_env

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "integrations.md").read_text()


def heading_before(at: int) -> str:
    start = DOC.rfind("\n## ", 0, at) + 4
    return DOC[start : DOC.index("\n", start)]


RECIPES = [
    (heading_before(m.start()), m.group(1), m.group(2))
    for m in re.finditer(r"<!-- recipe: (\w+) -->\n```python\n(.*?)```", DOC, re.DOTALL)
]
NEEDS = {
    "PyTorch Lightning": ("lightning.pytorch", "lightning"),
    "Hugging Face Trainer": ("transformers", "transformers"),
}


def test_the_doc_has_its_recipes() -> None:
    assert [name for name, _, _ in RECIPES] == [
        "AMP",
        "torch.compile",
        "FSDP2",
        "PyTorch Lightning",
        "Hugging Face Trainer",
    ]


@pytest.mark.parametrize(("name", "kind", "code"), RECIPES, ids=[name for name, _, _ in RECIPES])
def test_recipe_runs(
    name: str, kind: str, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if name in NEEDS:
        optional(*NEEDS[name])
    if name == "FSDP2" and cases.FSDP2_ON_CPU:
        pytest.skip(cases.FSDP2_ON_CPU)
    monkeypatch.chdir(tmp_path)
    if kind == "python":
        exec(compile(code, f"docs/integrations.md ({name})", "exec"), {"__name__": "__main__"})  # noqa: S102
        return
    assert kind == "torchrun"
    script = tmp_path / "recipe.py"
    script.write_text(code)
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            cwd=tmp_path,
            env=rank_env(rank, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=120)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [p.returncode for p in procs] == [0] * WORLD, "\n".join(o[-3000:] for o in outputs)
