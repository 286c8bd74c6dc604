"""Edge cases of ``python -m safeopt watch`` / ``run`` and ``safeopt.patch()`` found by probing:
a compiled step, modules whose methods fail, a ``torch.compile``-wrapped model, threads that
outlive the script, ``--json`` problems, a closed stdout, abbreviated options, metaclasses."""

from __future__ import annotations

from pathlib import Path

from script_runs import load_json, ok, python, safeopt, same_params

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
    done = ok(safeopt("watch", "--json", "w.json", "train.py", "watched.pt", cwd=tmp_path))
    assert same_params(tmp_path / "plain.pt", tmp_path / "watched.pt")
    (opt,) = load_json(tmp_path / "w.json")["optimizers"]
    assert opt["steps"] == 3
    assert "Linear.weight" in done.stderr and "verdict: affected" in done.stderr  # aux, idle
    done = ok(safeopt("run", "--json", "r.json", "train.py", "run.pt", cwd=tmp_path))
    assert load_json(tmp_path / "r.json")["steps"] == 3
