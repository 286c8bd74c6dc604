"""The release: a wheel built from this checkout installs into a clean virtual environment and works.

The wheel goes into a new venv (no checkout on its path, the torch release this suite runs on), and
from there: an import smoke test, the typed-package marker, the version from the package
metadata, and the README's demo (without matplotlib: the table alone) through both entry points.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

import pytest
import torch

import safeopt

ROOT = Path(__file__).resolve().parents[1]
DIST_NAME = "torch-safeopt"  # "safeopt" on the package index is an unrelated project


def _run(cmd: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv holding torch (the release running these tests) and the wheel built from ROOT."""
    work = tmp_path_factory.mktemp("package")
    _run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(work / "dist"), str(ROOT)],
        work,
    )
    (wheel,) = (work / "dist").glob("torch_safeopt-*.whl")
    venv.create(work / "venv", with_pip=True)
    python = work / "venv" / "bin" / "python"
    torch_release = torch.__version__.split("+")[0]
    _run([str(python), "-m", "pip", "install", "--quiet", str(wheel), f"torch=={torch_release}"], work)
    return python


def test_the_wheel_imports_outside_the_checkout(clean_venv: Path, tmp_path: Path) -> None:
    code = (
        "import importlib.metadata as m, pathlib, safeopt, torch\n"
        "assert 'site-packages' in safeopt.__file__, safeopt.__file__\n"
        f"assert safeopt.__version__ == m.version({DIST_NAME!r}), safeopt.__version__\n"
        "assert (pathlib.Path(safeopt.__file__).parent / 'py.typed').is_file()\n"
        "p = torch.nn.Parameter(torch.ones(3)); opt = safeopt.AdamW([p], lr=0.1)\n"
        "p.grad = torch.ones(3); opt.step(); moved = p.detach().clone()\n"
        "p.grad = torch.zeros(3); opt.step()\n"
        "assert torch.equal(p, moved) and not torch.equal(moved, torch.ones(3))\n"
        "print(safeopt.__version__, torch.__version__)\n"
    )
    done = _run([str(clean_venv), "-c", code], tmp_path)
    assert done.stdout.split()[0] == safeopt.__version__


@pytest.mark.parametrize("entry", ["module", "console_script"])
def test_the_demo_runs_from_the_wheel(clean_venv: Path, tmp_path: Path, entry: str) -> None:
    cmd = (
        [str(clean_venv), "-m", "safeopt", "demo"]
        if entry == "module"
        else [str(clean_venv.parent / "safeopt"), "demo"]
    )
    done = _run(cmd, tmp_path, timeout=300)
    assert "mixture of experts" in done.stdout
    assert "plot skipped: matplotlib is not installed" in done.stdout  # the demo extra is optional


def test_the_version_is_written_once() -> None:
    """pyproject.toml takes it from safeopt.__version__ (dynamic metadata), nowhere else."""
    text = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and 'version = { attr = "safeopt.__version__" }' in text
    assert "\nversion =" not in text.split("[tool.setuptools.dynamic]")[0]


@pytest.mark.skipif(
    not os.environ.get("SAFEOPT_EXPECT_INSTALLED"), reason="only under noxfile.py, which installs the wheel"
)
def test_the_tests_import_the_installed_wheel() -> None:
    assert "site-packages" in safeopt.__file__, f"the tests imported {safeopt.__file__}, not the wheel"
    assert metadata.version(DIST_NAME) == safeopt.__version__


def test_every_type_ignore_names_its_code_and_a_reason() -> None:
    import re

    bare = [
        f"{path.name}:{n}"
        for path in sorted((ROOT / "safeopt").glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "type: ignore" in line and not re.search(r"# type: ignore\[[-a-z,_]+\]  # \S", line)
    ]
    assert not bare, f"type: ignore without its error code and a reason: {bare}"
