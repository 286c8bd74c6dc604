"""The test suite on each supported torch, one nox session per version.

    pip install nox
    nox -s compat               # the compat subset on every supported torch (the release check)
    nox -s "compat(torch='2.6.0')"   # one version
    nox -s "tests(torch='2.14.1')"   # the whole suite on one version
    nox -l                      # every session

Each session is a virtual environment of its own (under .nox/, kept between runs: a torch build
from the package index is a CUDA build of about 5 GB) holding that torch and safeopt installed
from a wheel built from this checkout, not the checkout itself, so the tests import what a user
installs. The other packages come at the versions in .ci/constraints.txt. Supported range and
what each version skips: docs/supported.md.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["compat"]

# Every minor from the lower bound through the newest installable here, at its last patch.
# Keep in step with pyproject.toml (torch>=...) and docs/supported.md.
SUPPORTED = ("2.6.0", "2.7.1", "2.8.0", "2.9.1", "2.10.0", "2.11.0", "2.12.1", "2.13.0", "2.14.1")
OLDEST, NEWEST = SUPPORTED[0], SUPPORTED[-1]

# What a torch release can break: parity with torch over its optim_db, the seams with their
# canaries, the property machines, checkpoints, torch's own errors, rows, the capturable step,
# torch.compile and AMP, and wrap() of the optimizers of the compat extra (the compat matrix).
COMPAT = [
    "tests/test_parity.py",
    "tests/test_torch_compat.py",
    "tests/test_properties.py",
    "tests/test_state_dict.py",
    "tests/test_errors.py",
    "tests/test_rows.py",
    "tests/test_rule.py",
    "tests/test_capturable.py",
    "tests/test_rows_sparse.py",
    "tests/test_wrap.py",
    "tests/test_layers.py",
    "tests/test_amp_compile.py",
    "tests/test_compiled_step.py",
    "tests/test_compiled_probe.py",
    "tests/test_compat.py",
    "tests/test_edges_versions.py",
    "tests/test_patch.py",
    "tests/test_global_watch.py",
    "tests/test_groups.py",
]

ROOT = Path(__file__).parent
DIST = ROOT / ".nox" / "_dist"


def _install(session: nox.Session, torch: str) -> None:
    # torch first and pinned, so that nothing installed after it can swap in another release.
    session.install(f"torch=={torch}")
    wheels = str(DIST / f"torch-{torch}")
    # run_install: skipped, like session.install, under --no-install (reused environment as it is).
    session.run_install("python", "-c", f"import shutil; shutil.rmtree({wheels!r}, ignore_errors=True)")
    session.run_install("python", "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", wheels, str(ROOT))
    constraints = _constraints_beside_torch()
    session.install(
        "-c", constraints, "--find-links", wheels, "torch-safeopt[test,compat]", f"torch=={torch}"
    )
    # A reused environment may hold a wheel of the same version built from older code.
    session.install("--force-reinstall", "--no-deps", "--no-index", "--find-links", wheels, "torch-safeopt")


# torch's own requirements: each torch release pins them itself (torch 2.6: sympy==1.13.1), so the
# pins CI takes for its default torch must not apply to them.
TORCH_REQUIREMENTS = {
    "filelock",
    "fsspec",
    "jinja2",
    "markupsafe",
    "mpmath",
    "networkx",
    "sympy",
    "typing-extensions",
}


def _constraints_beside_torch() -> str:
    """.ci/constraints.txt without torch's own requirements."""
    out = DIST / "constraints-beside-torch.txt"
    DIST.mkdir(parents=True, exist_ok=True)
    lines = (ROOT / ".ci" / "constraints.txt").read_text().splitlines()
    kept = [
        line
        for line in lines
        if line.split("==")[0].strip().lower().replace("_", "-") not in TORCH_REQUIREMENTS
    ]
    out.write_text("\n".join(kept) + "\n")
    return str(out)


def _pytest(session: nox.Session, *args: str, ci: bool = True) -> None:
    # `pytest`, not `python -m pytest`: the latter would put the checkout's safeopt on sys.path.
    # CI=true also turns a missing optional client (lightning, transformers) into a failure.
    env = {"CI": "true" if ci else "", "HYPOTHESIS_PROFILE": "ci", "SAFEOPT_EXPECT_INSTALLED": "1"}
    session.run("pytest", "-q", "-p", "no:cacheprovider", *args, *session.posargs, env=env)


@nox.session
@nox.parametrize("torch", SUPPORTED)
def compat(session: nox.Session, torch: str) -> None:
    """The compat subset (parity, seams, properties, compile, the compat matrix) on one torch."""
    _install(session, torch)
    _pytest(session, *COMPAT, "tests/test_package.py::test_the_tests_import_the_installed_wheel")


@nox.session
@nox.parametrize("torch", SUPPORTED)
def tests(session: nox.Session, torch: str) -> None:
    """The whole suite on one torch (the optional Lightning / Hugging Face clients are skipped)."""
    _install(session, torch)
    _pytest(session, "-rs", ci=False)
