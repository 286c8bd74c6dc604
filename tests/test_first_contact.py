"""What a newcomer meets first (issue 21): the README and getting-started run as written, the
command line answers bad input with one line and status 2, the package says only what is true."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import safeopt
from safeopt.__main__ import _parser, main

ROOT = Path(__file__).resolve().parents[1]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``main(argv)`` as the shell sees it: (status, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code: int, err: str, option: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.match(rf"safeopt \w+: error: argument {option}: ", last), last


# --- the command line ------------------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--version"], capsys)
    assert code == 0
    assert out.strip() == f"safeopt {safeopt.__version__} (torch {torch.__version__})"


@pytest.mark.parametrize(
    ("argv", "option", "says"),
    [
        (["--model", "nosuchmodule:build"], "--model", "no module named 'nosuchmodule'"),
        (["--model", "json:nosuchfunction"], "--model", "json has no function 'nosuchfunction'"),
        (["--model", "json:dumps"], "--model", "json:dumps() raised TypeError"),
        (["--model", "json:JSONDecoder"], "--model", "must return an nn.Module or its parameters"),
        (["--optimizer", "AdamW(lr=-1.0)"], "--optimizer", "Invalid learning rate"),
        (["--idle-by", "rows", "--optimizer", "RMSprop"], "--idle-by", "rows needs one of Adam"),
    ],
)
def test_bad_arguments_found_after_parsing_are_one_line_and_status_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], option: str, says: str
) -> None:
    code, _, err = run(["bench", "--rounds", "1", "--min-run-time", "0.01", *argv], capsys)
    assert_usage_error(code, err, option)
    assert says in err


def test_cuda_asked_for_without_cuda_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run(["bench", "--device", "cuda"], capsys)
    assert_usage_error(code, err, "--device")
    assert "use --device cpu" in err


def test_debug_shows_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(Exception, match="no module named 'nosuchmodule'"):
        main(["bench", "--debug", "--model", "nosuchmodule:build"])


def test_the_real_process_prints_no_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "safeopt", "bench", "--model", "nosuchmodule:build"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        (
            "safeopt bench: error: argument --model: 'nosuchmodule:build': no module named 'nosuchmodule' "
            "(run from the folder that holds it, or add that folder to PYTHONPATH)"
        )
    ]


MODELS = """
import torch

def build():
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
"""


@pytest.mark.parametrize("entry", ["module", "console_script"])
def test_a_model_module_in_the_current_folder_is_found(tmp_path: Path, entry: str) -> None:
    """The installed command runs with its own folder first on sys.path; ``python -m`` with the
    current one. Both find a module in the current folder, as the README's example needs."""
    (tmp_path / "mymodels.py").write_text(MODELS)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "safeopt"  # what pip writes for [project.scripts]
    script.write_text(
        "import sys\nfrom safeopt.__main__ import _parser, main\nif __name__ == '__main__':\n    sys.exit(main())\n"
    )
    head = [sys.executable, "-m", "safeopt"] if entry == "module" else [sys.executable, str(script)]
    done = subprocess.run(
        [*head, "bench", "--model", "mymodels:build", "--device", "cpu", "--rounds", "1"]
        + ["--min-run-time", "0.01", "--idle", "0"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "4 tensors" in done.stdout and "safeopt/torch" in done.stdout


@pytest.mark.parametrize("command", [[], ["demo"], ["bench"]])
def test_help_is_plain_words(capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    code, out, _ = run([*command, "--help"], capsys)
    assert code == 0
    assert "``" not in out and "safeopt/_" not in out and ".py" not in out


def test_every_option_has_a_help_text() -> None:
    parser = _parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for p in [parser, *commands.choices.values()]:
        for action in p._actions:
            if not action.option_strings:
                continue  # the command name: described by each command's help
            assert action.help, f"{p.prog}: {action.option_strings or action.dest} has no help"


# --- the README and getting-started, as written ----------------------------------------------------


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.DOTALL | re.MULTILINE)


@pytest.mark.parametrize("page", ["README.md", "docs/getting-started.md"])
def test_every_python_block_runs_in_order_as_written(page: str, tmp_path: Path) -> None:
    blocks = python_blocks(ROOT / page)
    assert len(blocks) >= 3
    namespace: dict[str, object] = {"__name__": "__main__"}
    cwd = os.getcwd()
    os.chdir(tmp_path)  # anything a block writes lands here
    try:
        for i, block in enumerate(blocks):
            with contextlib.redirect_stdout(io.StringIO()):  # a failure names the page and the block
                exec(compile(block, f"{page}, python block {i + 1}", "exec"), namespace)  # noqa: S102
    finally:
        os.chdir(cwd)


def test_a_module_the_optimizer_does_not_hold_is_named_in_the_error() -> None:
    net, other = torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.nn.Linear(2, 2)
    opt = safeopt.Adam(net.parameters(), lr=0.1)
    with pytest.raises(
        ValueError, match=r"the module Linear \(id 0x[0-9a-f]+, 2 parameter\(s\)\) is held"
    ) as e:
        opt.freeze(other)
    assert "add_param_group" in str(e.value)


def test_no_page_shows_an_include_line_on_a_code_host() -> None:
    """``--8<--`` is the site's include syntax; a code host shows it as text. Pages use
    ``<!-- include: PATH -->`` (hidden there, expanded by docs/_hooks.py) next to a link."""
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        assert "--8<--" not in text, page.name
        for path in re.findall(r"^<!-- include: (\S+) -->$", text, re.MULTILINE):
            assert (ROOT / path).is_file(), (page.name, path)
            assert f"]({os.path.relpath(ROOT / path, page.parent)})" in text, f"{page.name}: link {path}"


def test_no_page_refers_to_the_issue_tracker() -> None:
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"\[[^\]]*\]\(https://github\.com/pytorch/pytorch/issues/\d+\)", "", page.read_text())
        assert not re.search(r"\bissue'?s?\b", text, re.IGNORECASE), page.name


# --- the package -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and, built from it, the wheel (``python -m build``, as the release does)."""
    if not os.environ.get("CI"):
        pytest.importorskip(
            "build.__main__", reason='the dev extra is not installed (pip install -e ".[dev]")'
        )
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_the_wheel_names_its_urls_and_the_python_it_was_tested_on(dists: Path) -> None:
    import zipfile

    (wheel,) = dists.glob("torch_safeopt-*.whl")
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        meta = z.read(name).decode()
    urls = dict(
        line.split(": ", 1)[1].split(", ", 1)
        for line in meta.splitlines()
        if line.startswith("Project-URL: ")
    )
    assert set(urls) == {"Homepage", "Documentation", "Issues", "Changelog"}
    assert all(u.startswith("https://") for u in urls.values())
    assert "Requires-Python: >=3.11\n" in meta  # CI runs 3.11; no other Python was tested
    minors = re.findall(r"^Classifier: Programming Language :: Python :: (3\.\d+)$", meta, re.MULTILINE)
    assert minors == ["3.11"]
    assert "Requires-Dist: torch>=2.6\n" in meta  # a lower bound only: no upper pin


def test_the_sdist_runs_the_tests_that_need_its_benchmarks(dists: Path, tmp_path: Path) -> None:
    import tarfile

    (sdist,) = dists.glob("torch_safeopt-*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    (root,) = tmp_path.iterdir()
    assert (root / "benchmarks" / "results" / "sparse.md").is_file()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    named = ["tests/test_benchmarks.py", "tests/test_bench_sparse.py", "tests/test_gpu_check.py"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *named],
        cwd=root,
        env={**env, "CI": "true"},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]
