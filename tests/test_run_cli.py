"""``python -m safeopt watch`` and ``run`` on a plain training script, unmodified, in a subprocess.

The script imports ``from torch.optim import AdamW`` at top level and has a branch that a zero
gate leaves with all-zero grads. Under ``watch`` every number of the run is the unwatched run's
and the report names the branch; under ``run`` the run is the one with ``safeopt.AdamW`` put in
by hand. The script's stdout and exit status are its own under both commands.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from safeopt.__main__ import _split_script
from script_runs import by_hand, load_json, ok, python, run, safeopt, same_params

TRAIN = """\
import sys

import torch
from torch.optim import AdamW

torch.manual_seed(0)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(6, 6)
        self.branch = torch.nn.Linear(6, 6)  # switched off by a zero gate: all-zero grads
        self.head = torch.nn.Linear(6, 1)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.head(h + 0.0 * self.branch(h))


model = Net()
opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
for step in range(8):
    opt.zero_grad(set_to_none=False)
    loss = model(torch.randn(16, 6)).pow(2).mean()
    loss.backward()
    opt.step()
    print(f"step {step} loss {loss.item():.6f}")
torch.save(model.state_dict(), sys.argv[1])
print("args", sys.argv[2:])
"""

BRANCH = {"branch.weight", "branch.bias"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("train")
    (d / "train.py").write_text(TRAIN)
    (d / "by_hand.py").write_text(
        by_hand(TRAIN, "from torch.optim import AdamW", "from safeopt import AdamW")
    )
    return d


@pytest.fixture(scope="module")
def plain(folder: Path) -> str:
    return ok(python("train.py", "plain.pt", "--json", "-h", cwd=folder)).stdout


def test_watch_changes_no_number_and_names_the_idle_branch(folder: Path, plain: str) -> None:
    done = ok(safeopt("watch", "--json", "w.json", "train.py", "watched.pt", "--json", "-h", cwd=folder))
    assert done.stdout == plain  # the script's output, every loss printed, untouched
    assert same_params(folder / "plain.pt", folder / "watched.pt")
    err = done.stderr
    assert "torch.optim.adamw.AdamW" in err and "verdict: affected" in err
    table = [line.split()[0] for line in err.splitlines() if line.startswith("branch.")]
    assert set(table) == BRANCH
    assert "fix: python -m safeopt run train.py watched.pt --json -h" in err
    (opt,) = load_json(folder / "w.json")["optimizers"]
    assert opt["class"] == "torch.optim.adamw.AdamW" and opt["steps"] == 8
    params = {p["name"]: p for p in opt["params"]}
    assert set(params) == {f"{m}.{k}" for m in ("body", "branch", "head") for k in ("weight", "bias")}
    for name, p in params.items():
        assert set(p) == {"name", "shape", "idle_steps", "moved_steps", "l2", "max_abs"}
        idle = name in BRANCH
        assert p["idle_steps"] == (8 if idle else 0), name
        assert p["moved_steps"] == (8 if idle else 0), name  # AdamW's weight decay moves them
        assert (p["l2"] > 0) == idle and (p["max_abs"] > 0) == idle
    assert params["branch.weight"]["shape"] == [6, 6]


def test_run_equals_safeopt_put_in_by_hand(folder: Path, plain: str) -> None:
    done = ok(safeopt("run", "--json", "r.json", "train.py", "run.pt", "--json", "-h", cwd=folder))
    hand = ok(python("by_hand.py", "hand.pt", "--json", "-h", cwd=folder))
    assert same_params(folder / "run.pt", folder / "hand.pt")
    assert done.stdout == hand.stdout
    assert not same_params(folder / "run.pt", folder / "plain.pt")  # torch's AdamW moved the branch
    assert "safeopt.AdamW x1 (8 step(s))" in done.stderr
    assert "16 with an all-zero grad" in done.stderr  # two parameters, eight steps
    summary = load_json(folder / "r.json")
    assert summary["lazy"] == {"safeopt.AdamW": 1} and summary["skipped_zero_grad"] == 16


def test_run_then_watch_finds_no_ghost_update(folder: Path) -> None:
    """The fix the report suggests, checked by watch itself: safeopt's AdamW under watch."""
    done = ok(safeopt("watch", "by_hand.py", "hand2.pt", cwd=folder))
    assert "safeopt.AdamW" in done.stderr and "verdict: not affected" in done.stderr


EXITS = """\
import sys
print("out", sys.argv[1:])
sys.stdout.flush()
if sys.argv[1] == "exit3":
    sys.exit(3)
if sys.argv[1] == "message":
    sys.exit("a message")
if sys.argv[1] == "raise":
    def inner():
        raise ValueError("boom")
    inner()
"""


@pytest.mark.parametrize("command", ["watch", "run"])
@pytest.mark.parametrize("how", ["exit3", "message", "raise", "fine"])
def test_stdout_and_exit_status_are_the_scripts(tmp_path: Path, command: str, how: str) -> None:
    (tmp_path / "exits.py").write_text(EXITS)
    plain = python("exits.py", how, cwd=tmp_path)
    done = safeopt(command, "exits.py", how, cwd=tmp_path)
    assert (done.returncode, done.stdout) == (plain.returncode, plain.stdout)
    assert plain.returncode == {"exit3": 3, "message": 1, "raise": 1, "fine": 0}[how]
    # Python's own stderr comes first, as it would, then the report.
    assert done.stderr.startswith(plain.stderr), done.stderr
    report = done.stderr[len(plain.stderr) :]
    assert ("no torch.optim optimizer stepped" if command == "watch" else "no optimizer stepped") in report
    if how == "raise":
        assert "safeopt" not in plain.stderr and "runpy" not in done.stderr.split("ValueError")[0]


WHERE = """\
import os, sys
print(__name__, os.path.basename(__file__), os.path.isabs(__file__), sys.argv, sys.path[0] == os.path.dirname(os.path.abspath(__file__)))
import helper
print(helper.VALUE)
"""


def test_the_script_sees_what_python_gives_it(tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "where.py").write_text(WHERE)
    (sub / "helper.py").write_text("VALUE = 'helper from the script folder'\n")
    plain = ok(python("sub/where.py", "-x", "--json", "y", cwd=tmp_path))
    for command in ("watch", "run"):
        assert ok(safeopt(command, "sub/where.py", "-x", "--json", "y", cwd=tmp_path)).stdout == plain.stdout
    assert "__main__ where.py True ['sub/where.py', '-x', '--json', 'y'] True" in plain.stdout


def test_a_module_runs_as_python_m_runs_it(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text(
        "import sys\nfrom . import __name__ as parent\nprint(__name__, parent, sys.argv[1:])\nsys.exit(4)\n"
    )
    plain = run([sys.executable, "-m", "pkg.train", "--json", "x"], tmp_path)
    done = safeopt("watch", "-m", "pkg.train", "--json", "x", cwd=tmp_path)
    assert (
        (done.returncode, done.stdout)
        == (plain.returncode, plain.stdout)
        == (4, "__main__ pkg ['--json', 'x']\n")
    )


@pytest.mark.parametrize(
    ("argv", "option", "says"),
    [
        (["watch", "nosuchscript.py"], "SCRIPT", "can't open file 'nosuchscript.py'"),
        (["run", "-m", "nosuchmodule"], "-m", "no module named 'nosuchmodule'"),
        (["watch"], "SCRIPT", "a script to run is required"),
        (["run", "--rows", "(", "x.py"], "--rows", "is not a regular expression"),
        (["watch", "--json", "/no/such/folder/x.json", "x.py"], "--json", "does not exist"),
    ],
)
def test_bad_usage_is_one_line_and_status_2(tmp_path: Path, argv: list[str], option: str, says: str) -> None:
    (tmp_path / "x.py").write_text("print('never runs')\n")
    done = run([sys.executable, "-m", "safeopt", *argv], tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"safeopt {argv[0]}: error: argument {option}: ") and says in line, line


def test_the_scripts_arguments_are_cut_where_python_would() -> None:
    assert _split_script(["watch", "--json", "a.json", "s.py", "--json", "b", "-h"]) == (
        ["watch", "--json", "a.json", "s.py"],
        ["--json", "b", "-h"],
    )
    assert _split_script(["--debug", "run", "--rows", "emb", "--wrap-all", "-m", "pkg.mod", "-m", "x"]) == (
        ["--debug", "run", "--rows", "emb", "--wrap-all", "-m", "pkg.mod"],
        ["-m", "x"],
    )
    assert _split_script(["run", "--", "-odd.py", "a"]) == (["run", "--", "-odd.py"], ["a"])
    assert _split_script(["bench", "--rounds", "1"]) == (["bench", "--rounds", "1"], [])


EMBED = """\
import sys

import torch

torch.manual_seed(0)
model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(20, 4), "head": torch.nn.Linear(4, 1)})
adam = torch.optim.Adam(model.parameters(), lr=0.1)
extra = torch.nn.Parameter(torch.ones(3))
nadam = torch.optim.NAdam([extra], lr=0.1)
for step in range(5):
    adam.zero_grad(set_to_none=False)
    model["head"](model["embed"](torch.tensor([step % 3]))).sum().backward()  # rows 3..19 unused
    adam.step()
    extra.grad = torch.zeros(3) if step % 2 else torch.ones(3)
    nadam.step()
print([g.get("lazy") for g in adam.param_groups], type(nadam).__name__)
torch.save({**model.state_dict(), "extra": extra.detach()}, sys.argv[1])
"""


def test_run_rows_and_wrap_all_equal_safeopt_by_hand(tmp_path: Path) -> None:
    (tmp_path / "embed.py").write_text(EMBED)
    hand = by_hand(
        by_hand(
            EMBED,
            "torch.optim.Adam(model.parameters(), lr=0.1)",
            'safeopt.Adam([{"params": model["head"].parameters()}, '
            '{"params": model["embed"].parameters(), "lazy": "rows"}], lr=0.1)',
        ),
        "nadam = torch.optim.NAdam([extra], lr=0.1)",
        "nadam = safeopt.wrap(torch.optim.NAdam([extra], lr=0.1))",
    )
    (tmp_path / "hand.py").write_text("import safeopt\n" + hand)
    done = ok(safeopt("run", "--rows", "^embed\\.", "--wrap-all", "embed.py", "run.pt", cwd=tmp_path))
    ok(python("hand.py", "hand.pt", cwd=tmp_path))
    assert same_params(tmp_path / "run.pt", tmp_path / "hand.pt")
    assert done.stdout == "[True, 'rows'] NAdam\n"  # the script's own optimizer, in place
    assert "rows='^embed\\\\.', wrap_all=True" in done.stderr
    assert "safeopt.Adam x1, torch.optim.NAdam x1" in done.stderr


def test_the_affected_page_shows_a_real_report() -> None:
    """docs/affected.md's report is the one ``watch`` prints for examples/idle_branch.py (the drift
    figures aside: the last digits may differ between machines)."""
    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "affected.md").read_text()
    shown = page.split("$ python -m safeopt watch examples/idle_branch.py\n", 1)[1].split("```", 1)[0]
    done = ok(safeopt("watch", "examples/idle_branch.py", cwd=root))

    def stable(text: str) -> list[str]:
        return [
            line.split("  ")[0] if "drift" in line else " ".join(line.split()[:4])
            for line in text.splitlines()
        ]

    assert stable(shown) == stable(done.stdout + done.stderr)
    assert "fix: python -m safeopt run examples/idle_branch.py" in shown


@pytest.mark.parametrize("command", ["watch", "run"])
def test_help_is_plain_words(command: str) -> None:
    done = run([sys.executable, "-m", "safeopt", command, "--help"], Path.cwd())
    assert done.returncode == 0 and "SCRIPT [ARGS ...]" in done.stdout and "-m MODULE" in done.stdout
    assert "``" not in done.stdout and "safeopt/_" not in done.stdout and ".py" not in done.stdout


def test_a_package_of_the_module_is_imported_under_the_patch(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from torch.optim import AdamW\n")
    (pkg / "train.py").write_text("from pkg import AdamW\nprint(AdamW.__module__)\n")
    done = ok(safeopt("run", "-m", "pkg.train", cwd=tmp_path))
    assert done.stdout == "safeopt._patch\n"


@pytest.mark.parametrize("command", ["watch", "run"])
def test_ctrl_c_ends_the_process_as_python_would(tmp_path: Path, command: str) -> None:
    (tmp_path / "stop.py").write_text("print('before')\nraise KeyboardInterrupt\n")
    plain = python("stop.py", cwd=tmp_path)
    done = safeopt(command, "stop.py", cwd=tmp_path)
    assert (done.returncode, done.stdout) == (plain.returncode, plain.stdout) == (-2, "before\n")
    assert done.stderr.rstrip().endswith("KeyboardInterrupt") and "safeopt" in done.stderr  # the report first
