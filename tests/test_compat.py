"""The compatibility matrix: every optimizer of tests/compat_matrix.py holds in every column, and
docs/compat.md is what a fresh run generates.

The optimizers come from the ``compat`` extra. Without it, an optimizer whose package is missing
is skipped, saying which; with ``SAFEOPT_COMPAT=1`` (CI, which installs the extra) a missing
package fails, since the page could not be generated.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re

import pytest
import torch

import compat_matrix

REQUIRED = os.environ.get("SAFEOPT_COMPAT") == "1"
# What wrap() refuses at wrap(), saying why and what to use instead.
REFUSED = {"torch.optim.LBFGS": "re-evaluates its closure"}
HOLDS = compat_matrix.HOLDS


def _not_in_this_torch(entry: compat_matrix.Entry) -> str | None:
    """Why a torch.optim row cannot run on the installed torch (Muon arrived after torch 2.6)."""
    name = entry.name.removeprefix("torch.optim.")
    if entry.package == "torch" and not hasattr(torch.optim, name):
        return f"torch {torch.__version__} has no torch.optim.{name}"
    return None


def _page_torch() -> str:
    """The torch version docs/compat.md was generated on."""
    found = re.search(r"Versions: torch ([^,]+),", compat_matrix.PAGE.read_text())
    assert found, "docs/compat.md names no torch version"
    return found.group(1)


def _missing(entry: compat_matrix.Entry) -> str | None:
    module = entry.name.rsplit(".", 1)[0].split(".")[0]
    if importlib.util.find_spec(module) is None:
        return f"{entry.package} is not installed (pip install torch-safeopt[compat])"
    return None


@functools.cache
def _row(name: str) -> dict[str, str]:
    return compat_matrix.row(next(e for e in compat_matrix.CATALOGUE if e.name == name))


@pytest.mark.parametrize("entry", compat_matrix.CATALOGUE, ids=lambda e: e.name)
def test_every_column_holds(entry: compat_matrix.Entry) -> None:
    missing = _missing(entry)
    if missing:
        if REQUIRED:
            pytest.fail(missing)
        pytest.skip(missing)
    absent = _not_in_this_torch(entry)
    if absent:  # not a pass: the optimizer does not exist here
        pytest.skip(absent)
    cells = _row(entry.name)
    generated_on, here = _page_torch(), torch.__version__.split("+")[0]
    if cells.get("accepted", "").startswith("not available") and here != generated_on:
        # A package of the compat extra that does not import on this torch (torchao 0.18 on 2.6):
        # the package's support range, not safeopt's. On the page's torch it fails, below.
        pytest.skip(f"{entry.package} does not work with torch {here}: {cells['accepted']}")
    if entry.name in REFUSED:
        assert cells["accepted"].startswith("refused") and REFUSED[entry.name] in cells["accepted"]
        return
    failing = {
        column: cell for column, cell in cells.items() if cell not in HOLDS and column != "bare, zero grads"
    }
    assert not failing, f"{entry.name}: {failing}"


def test_the_page_is_a_fresh_generation() -> None:
    missing = sorted({m for e in compat_matrix.CATALOGUE if (m := _missing(e))})
    if missing:
        if REQUIRED:
            pytest.fail("the matrix cannot be generated: " + "; ".join(missing))
        pytest.skip("the matrix needs the compat extra: " + "; ".join(missing))
    generated_on, here = _page_torch(), torch.__version__.split("+")[0]
    if here != generated_on:  # the rows are checked on every torch by test_every_column_holds
        pytest.skip(f"docs/compat.md is generated on torch {generated_on} (CI's default); this is {here}")
    fresh = compat_matrix.render({e.name: _row(e.name) for e in compat_matrix.CATALOGUE})
    assert compat_matrix.PAGE.read_text() == fresh, (
        "docs/compat.md is stale: run python tests/compat_matrix.py"
    )


class DecayAll(compat_matrix.torch.optim.Optimizer):
    """Decays every parameter of its groups, grad or not."""

    def __init__(self, params) -> None:
        super().__init__(params, {})

    @compat_matrix.torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.mul_(0.5)


def test_the_checks_catch_an_optimizer_that_breaks_the_rule() -> None:
    cells = compat_matrix.row(compat_matrix.Entry("DecayAll", "torch", DecayAll))
    assert cells["bare, zero grads"] == "moves idle"
    assert cells["idle untouched"].startswith("no: idle param 1 moved")
    assert cells["strict"].startswith("no: param 1 differs from the bare optimizer"), (
        "strict keeps it, torch would not"
    )
    assert cells["freeze"].startswith("no: a frozen parameter moved")
