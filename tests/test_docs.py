"""Every public name is documented, and the README's claims run as written."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

import safeopt

ROOT = Path(__file__).resolve().parents[1]
API = (ROOT / "docs" / "api.md").read_text()
README = (ROOT / "README.md").read_text()
PUBLIC = [name for name in safeopt.__all__ if name != "__version__"]
FREEZE_API = ["freeze", "unfreeze", "is_frozen", "frozen"]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_has_a_docstring_and_an_api_entry(name: str) -> None:
    obj = getattr(safeopt, name)
    if name != "Target":  # a type alias: documented in docs/api.md only
        assert (obj.__doc__ or "").strip(), f"safeopt.{name} has no docstring"
    assert re.search(rf"^## safeopt\.{name}\b", API, re.MULTILINE), f"docs/api.md has no '## safeopt.{name}' section"


@pytest.mark.parametrize("method", FREEZE_API)
def test_freeze_api_is_documented(method: str) -> None:
    assert (getattr(safeopt.Adam, method).__doc__ or "").strip()
    assert f"`{method}(target" in API


def test_readme_ghost_update_and_fix_print_what_they_say() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, re.DOTALL)
    namespace: dict[str, object] = {}
    printed = []
    for block in blocks[:2]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(block, namespace)  # noqa: S102
        printed.append(out.getvalue().strip())
    assert printed == ["False", "True"]
