"""The docs site builds with ``mkdocs build --strict``: no broken link or anchor, no missing page,
every ``:::`` reference resolves, every snippet of examples/ is found."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if not os.environ.get("CI"):
    pytest.importorskip("mkdocs", reason='the docs extra is not installed (pip install -e ".[docs]")')


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(out),
        ],
        check=False,
        cwd=out,  # not the repository root: paths in mkdocs.yml must not depend on it
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def text(page: Path) -> str:
    """The page's text: tags dropped (highlighting splits code into spans), entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text(encoding="utf-8")))


def test_every_nav_page_is_built(site: Path) -> None:
    for page in ["getting-started", "rule", "recipes", "diagnostics", "migrating", "faq", "api", "reference"]:
        assert (site / page / "index.html").is_file(), page
    assert (site / "index.html").is_file()


def test_the_reference_is_generated_from_the_docstrings(site: Path) -> None:
    import safeopt

    reference = text(site / "reference" / "index.html")
    for name in [
        "Adam",
        "AdamW",
        "SGD",
        "wrap",
        "LazyWrapper",
        "audit",
        "AuditReport",
        "watch",
        "Watch",
        "WatchReport",
    ]:
        assert f"safeopt.{name}" in reference, name
    # A sentence from a docstring, not from the Markdown source.
    first = (safeopt.watch.__doc__ or "").split("\n")[0].replace("``", "")
    assert first in reference
    assert ":meth:" not in reference  # Sphinx roles are dropped


def test_recipes_show_the_tested_examples_and_link_them(site: Path) -> None:
    page = (site / "recipes" / "index.html").read_text(encoding="utf-8")
    for example in sorted((ROOT / "examples").glob("*.py")):
        assert (site / "repo" / "examples" / example.name).read_bytes() == example.read_bytes()
        assert f'href="../repo/examples/{example.name}"' in page
    recipes = text(site / "recipes" / "index.html")
    assert 'with opt.frozen("discriminator"):' in recipes  # the snippets are included, not only linked
    assert "--8<--" not in recipes
