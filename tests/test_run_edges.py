"""Edge cases of ``python -m safeopt watch`` / ``run`` and ``safeopt.patch()`` found by probing:
a compiled step, modules whose methods fail, a ``torch.compile``-wrapped model, threads that
outlive the script, ``--json`` problems, a closed stdout, abbreviated options, metaclasses."""

from __future__ import annotations

import abc
import gc
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import safeopt
from safeopt.__main__ import main
from safeopt._observe import GlobalWatch, module_names
from script_runs import load_json, ok, python, same_params
from script_runs import run as run_cmd
from script_runs import safeopt as cli

COMPILED_STEP = """\
import sys
import torch
from torch import nn

torch.manual_seed(0)
m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
aux = nn.Linear(4, 1)
opt = torch.optim.AdamW([*m.parameters(), *aux.parameters()], lr=0.01, weight_decay=0.1)


@torch.compile(backend="eager")
def step():
    opt.step()


for i in range(3):
    opt.zero_grad(set_to_none=False)
    loss = m(torch.randn(2, 4)).sum()
    if i == 0:
        loss = loss + aux(torch.randn(2, 4)).sum()
    loss.backward()
    step()
torch.save({**m.state_dict(), **{"aux." + k: v for k, v in aux.state_dict().items()}}, sys.argv[1])
"""


def write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(source)
    return path


def test_watch_and_run_of_a_compiled_step(tmp_path: Path) -> None:

    write(tmp_path, "train.py", COMPILED_STEP)
    ok(python("train.py", "plain.pt", cwd=tmp_path))
    done = ok(cli("watch", "--json", "w.json", "train.py", "watched.pt", cwd=tmp_path))
    assert same_params(tmp_path / "plain.pt", tmp_path / "watched.pt")
    (opt,) = load_json(tmp_path / "w.json")["optimizers"]
    assert opt["steps"] == 3
    assert "Linear.weight" in done.stderr and "verdict: affected" in done.stderr  # aux, idle
    done = ok(cli("run", "--json", "r.json", "train.py", "run.pt", cwd=tmp_path))
    assert load_json(tmp_path / "r.json")["steps"] == 3


class OldSignature(nn.Module):
    """A module written for torch before 1.13: ``named_parameters`` without ``remove_duplicate``."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 3)

    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Any:  # type: ignore[override]  # the old signature is the point
        return super().named_parameters(prefix, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)  # type: ignore[no-any-return]  # nn.Module calls are Any


def watched_steps(model: nn.Module, steps: int = 2) -> dict[str, Any]:
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    watch = GlobalWatch()
    watch.start()
    try:
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(2, 3)).sum().backward()
            opt.step()
    finally:
        watch.stop()
    (data,) = watch.as_dict()["optimizers"]
    return data


@pytest.mark.parametrize("odd", ["old_signature", "no_init"])
def test_a_module_whose_methods_fail_is_skipped_not_the_step(odd: str) -> None:
    keep = OldSignature() if odd == "old_signature" else nn.Linear.__new__(nn.Linear)
    model = nn.Sequential(nn.Linear(3, 3))
    data = watched_steps(model)
    assert data["steps"] == 2 and [p["name"] for p in data["params"]] == ["0.weight", "0.bias"]
    with safeopt.patch(rows=r"^0\.weight$"):
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]
    assert opt.param_groups[1]["params"][0] is model[0].weight
    del keep


def test_a_module_with_the_old_signature_is_still_named() -> None:
    model = OldSignature()
    data = watched_steps(model)
    assert [p["name"] for p in data["params"]] == ["inner.weight", "inner.bias"]


def test_a_compiled_model_is_named_as_the_model_itself() -> None:
    model = nn.Sequential(nn.Linear(3, 3))
    compiled = torch.compile(model, backend="eager")
    names = module_names(list(model.parameters()))
    assert sorted(names.values()) == ["0.bias", "0.weight"]
    with safeopt.patch(rows=r"^0\.weight$"):
        opt = torch.optim.AdamW(compiled.parameters(), lr=0.1)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]
    assert opt.param_groups[1]["params"][0] is model[0].weight
    del compiled


LATE_THREAD = """\
import threading
import time

import torch
from torch import nn


def train():
    time.sleep(0.3)  # the main module has ended by now
    model = nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    print("built", type(opt).__module__, flush=True)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, 3)).sum().backward()
        opt.step()


threading.Thread(target=train).start()  # not a daemon: Python waits for it at exit
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()  # a daemon: not waited for
print("main done", flush=True)
"""


def test_a_thread_that_outlives_the_script_is_watched_and_patched(tmp_path: Path) -> None:
    write(tmp_path, "late.py", LATE_THREAD)
    done = ok(cli("watch", "--json", "w.json", "late.py", cwd=tmp_path))
    (opt,) = load_json(tmp_path / "w.json")["optimizers"]
    assert opt["steps"] == 3 and "1 optimizer(s) stepped" in done.stderr
    done = ok(cli("run", "--json", "r.json", "late.py", cwd=tmp_path))
    assert "built safeopt._patch" in done.stdout
    assert load_json(tmp_path / "r.json")["steps"] == 3


def strict_json(path: Path) -> Any:
    def refuse(name: str) -> None:
        raise AssertionError(f"{path} holds {name}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def main_in(
    folder: Path, argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "argv", ["safeopt"])
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        status = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("command", ["watch", "run"])
def test_json_path_is_taken_before_the_script_moves(
    tmp_path: Path, command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "elsewhere").mkdir()
    write(tmp_path, "s.py", "import os\nos.chdir('elsewhere')\n")
    status, _, err = main_in(tmp_path, [command, "--json", "o.json", "s.py"], monkeypatch, capsys)
    assert status == 0, err
    assert (tmp_path / "o.json").is_file() and not (tmp_path / "elsewhere" / "o.json").exists()


@pytest.mark.parametrize("command", ["watch", "run"])
def test_a_json_folder_is_refused_before_the_script_runs(
    tmp_path: Path, command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, "s.py", "print('ran')\n")
    status, out, err = main_in(tmp_path, [command, "--json", ".", "s.py"], monkeypatch, capsys)
    assert (status, out) == (2, "")
    (line,) = err.strip().splitlines()
    assert line.startswith(f"safeopt {command}: error: argument --json: ") and "folder" in line, line


@pytest.mark.parametrize("command", ["watch", "run"])
@pytest.mark.parametrize(("exit", "status"), [(0, 1), (3, 3)])
def test_a_json_that_cannot_be_written_keeps_the_scripts_status(
    tmp_path: Path,
    command: str,
    exit: int,
    status: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "out").mkdir()
    write(tmp_path, "s.py", f"import shutil, sys\nshutil.rmtree('out')\nsys.exit({exit})\n")
    got, _, err = main_in(tmp_path, [command, "--json", "out/o.json", "s.py"], monkeypatch, capsys)
    assert got == status
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "out/o.json" in lines[0], err


NON_FINITE = """\
import torch

p = torch.nn.Parameter(torch.ones(2))
q = torch.nn.Parameter(torch.ones(2))
r = torch.nn.Parameter(torch.ones(2))
opt = torch.optim.SGD([p, q, r], lr=1.0, momentum=0.9)
for i in range(3):  # q's momentum overflows, r's is NaN: both move without a grad afterwards
    opt.zero_grad(set_to_none=False)
    loss = p.sum()
    if i == 0:
        loss = loss + (q * 3e38).sum() + (r * torch.tensor([float("nan"), 1.0])).sum()
    loss.backward()
    opt.step()
"""


def test_json_writes_non_finite_numbers_as_strings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, "s.py", NON_FINITE)
    status, _, err = main_in(tmp_path, ["watch", "--json", "o.json", "s.py"], monkeypatch, capsys)
    assert status == 0, err
    (opt,) = strict_json(tmp_path / "o.json")["optimizers"]
    p, q, r = opt["params"]
    assert (p["l2"], q["l2"], r["l2"]) == (0.0, "inf", "nan")
    assert (q["max_abs"], r["max_abs"]) == ("inf", "nan")


def test_a_script_that_closes_stdout_keeps_its_status_and_report(tmp_path: Path) -> None:
    write(tmp_path, "s.py", "import sys\nprint('hi')\nsys.stdout.close()\n")
    for command in ("watch", "run"):
        done = cli(command, "s.py", cwd=tmp_path)
        assert (done.returncode, done.stdout) == (0, "hi\n"), done.stderr
        assert "no torch.optim optimizer stepped" in done.stderr or "no optimizer stepped" in done.stderr


@pytest.mark.parametrize("command", ["watch", "run"])
def test_options_are_not_abbreviated(
    tmp_path: Path, command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, "s.py", "print('ran')\n")
    status, out, err = main_in(tmp_path, [command, "--js", "o.json", "s.py"], monkeypatch, capsys)
    assert (status, out) == (2, "")
    assert "unrecognized arguments: --js" in err, err


def test_a_subclass_with_an_abc_mixin_under_the_patch() -> None:
    p = [nn.Parameter(torch.zeros(2))]
    with safeopt.patch():

        class Mixed(torch.optim.AdamW, abc.ABC):  # type: ignore[misc]  # the patched name is safeopt's
            @abc.abstractmethod
            def extra(self) -> int: ...

        class Done(Mixed):
            def extra(self) -> int:
                return 1

        with pytest.raises(TypeError, match="abstract"):
            Mixed(p)  # type: ignore[abstract]  # what the ABC is for
        opt = Done(p, lr=0.1)
    assert isinstance(opt, safeopt.AdamW) and isinstance(opt, torch.optim.AdamW) and opt.extra() == 1


def test_a_subclass_made_under_the_patch_does_not_claim_torchs_instances() -> None:
    p = [nn.Parameter(torch.zeros(2))]
    plain = torch.optim.AdamW(p)
    with safeopt.patch():

        class MyAdam(torch.optim.AdamW):  # type: ignore[misc]  # the patched name is safeopt's
            pass

        assert isinstance(plain, torch.optim.AdamW)  # the patched name itself keeps them
        assert issubclass(type(plain), torch.optim.AdamW)
        assert not isinstance(plain, MyAdam) and not issubclass(type(plain), MyAdam)
        mine = MyAdam(p)
    assert isinstance(mine, MyAdam) and isinstance(mine, safeopt.AdamW)


def test_optimizers_dropped_but_not_yet_collected_at_stop_are_reported() -> None:
    model = nn.Linear(3, 3)
    watch = GlobalWatch()
    watch.start()
    gc.disable()  # as when the collector has not run since the script dropped them
    try:
        for _ in range(3):
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            opt.zero_grad()
            model(torch.randn(2, 3)).sum().backward()
            opt.step()
            del opt
    finally:
        watch.stop()
        gc.enable()
    gc.collect()
    assert [s.data["steps"] for s in watch.summaries()] == [1, 1, 1]


def test_a_thread_alive_before_the_script_is_not_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only the script's own threads are joined: in a process that had a thread running before
    (a server, a loader, an earlier test), the command still returns (it hung before)."""
    import threading

    write(tmp_path, "quick.py", "print('done')\n")
    release = threading.Event()
    waiting = threading.Thread(target=release.wait)  # not a daemon, and not the script's
    waiting.start()
    result: list[tuple[int, str, str]] = []
    runner = threading.Thread(
        target=lambda: result.append(main_in(tmp_path, ["watch", "quick.py"], monkeypatch, capsys)),
        daemon=True,
    )
    try:
        runner.start()
        runner.join(60)
        assert not runner.is_alive(), "watch waited for a thread that was running before the script"
        assert result[0][:2] == (0, "done\n")
    finally:
        release.set()
        waiting.join()


EXECUTOR = """
import concurrent.futures
import torch

pool = concurrent.futures.ThreadPoolExecutor(2)  # never shut down: Python ends it at exit
concurrent.futures.kept = pool  # held by a library (a loader, a cache), not only the script
p = torch.nn.Parameter(torch.ones(3))
opt = torch.optim.AdamW([p], lr=0.1)
for grad in pool.map(lambda i: torch.full((3,), float(i % 2)), range(3)):
    p.grad = grad
    opt.step()
print("trained")
"""


@pytest.mark.parametrize("command", ["watch", "run"])
def test_a_thread_pool_left_open_ends_as_at_exit(tmp_path: Path, command: str) -> None:
    """An executor's idle workers end only when Python's exit callbacks tell them to; the command
    runs those before it waits for the script's threads (it waited forever before)."""
    import subprocess

    write(tmp_path, "pool.py", EXECUTOR)
    try:
        done = ok(run_cmd([sys.executable, "-m", "safeopt", command, "pool.py"], tmp_path, timeout=120))
    except subprocess.TimeoutExpired:
        pytest.fail(f"safeopt {command} waited for the idle workers of a thread pool")
    assert done.stdout == "trained\n"
