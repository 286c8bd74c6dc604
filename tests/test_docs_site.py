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


def text_of(markup: str) -> str:
    """Markup as text: tags dropped (highlighting splits code into spans), entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


def text(page: Path) -> str:
    return text_of(page.read_text(encoding="utf-8"))


def test_every_nav_page_is_built(site: Path) -> None:
    for page in [
        "getting-started",
        "rule",
        "recipes",
        "diagnostics",
        "migrating",
        "faq",
        "api",
        "benchmarks",
    ]:
        assert (site / page / "index.html").is_file(), page
    assert (site / "index.html").is_file()


def test_the_api_page_is_generated_from_the_docstrings_of_every_public_name(site: Path) -> None:
    import safeopt

    page = (site / "api" / "index.html").read_text(encoding="utf-8")
    ids = set(re.findall(r'<h[2-4][^>]*\bid="([^"]+)"', page))
    headings = {
        text_of(h).strip().rstrip("¶").strip()
        for h in re.findall(r"<h[2-4][^>]*>(.*?)</h[2-4]>", page, re.DOTALL)
    }
    for name in safeopt.__all__:
        if name != "__version__":
            assert f"safeopt.{name}" in ids or f"safeopt.{name}" in headings, (
                f"docs/api.md has no entry for {name}"
            )
    api = text(site / "api" / "index.html")
    for method in ["freeze", "unfreeze", "is_frozen", "frozen"]:  # the freeze API, from its docstrings
        assert f"{method}(target" in api, method
    # Sentences from docstrings, not from the Markdown source.
    for fn in (safeopt.watch, safeopt.bench):
        assert (fn.__doc__ or "").split("\n")[0].replace("``", "") in api
    assert "table(limit: int | None = 20)" in api  # the signature as the code has it
    assert ":meth:" not in api  # Sphinx roles are dropped


def test_recipes_show_the_tested_examples_and_link_them(site: Path) -> None:
    page = (site / "recipes" / "index.html").read_text(encoding="utf-8")
    for example in sorted((ROOT / "examples").glob("*.py")):
        assert (site / "repo" / "examples" / example.name).read_bytes() == example.read_bytes()
        assert f'href="../repo/examples/{example.name}"' in page
    recipes = text(site / "recipes" / "index.html")
    assert 'with opt.frozen("discriminator"):' in recipes  # the snippets are included, not only linked
    assert "--8<--" not in recipes
