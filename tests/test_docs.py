"""Every public name is documented, and the README's claims run as written."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

import safeopt

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PUBLIC = [name for name in safeopt.__all__ if name != "__version__"]
FREEZE_API = ["freeze", "unfreeze", "is_frozen", "frozen"]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_has_a_docstring(name: str) -> None:
    # docs/api.md is generated from these; tests/test_docs_site.py checks every name has an entry there.
    obj = getattr(safeopt, name)
    if name != "Target":  # a type alias: described in docs/api.md by hand
        assert (obj.__doc__ or "").strip(), f"safeopt.{name} has no docstring"


@pytest.mark.parametrize("method", FREEZE_API)
def test_freeze_api_has_docstrings(method: str) -> None:
    assert (getattr(safeopt.Adam, method).__doc__ or "").strip()


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
