"""Running a user's script in a subprocess: plainly, under ``python -m safeopt watch`` or ``run``.

Shared by tests/test_run_cli.py, tests/test_patch.py and tests/test_frameworks_run.py. The script
is written to a temporary folder, unmodified user code; it saves its final parameters with
``torch.save`` where its first argument says, so that runs can be compared with ``bit_equal``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from harness import bit_equal

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PYTHONHASHSEED": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }


def run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def together(*cmds: list[str], cwd: Path, timeout: int = 300) -> list[subprocess.CompletedProcess[str]]:
    """The commands run at once (a framework's import dominates each): their results in order."""
    procs = [
        subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for cmd in cmds
    ]
    done = []
    for cmd, proc in zip(cmds, procs):
        out, err = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return done


def python(script: str | Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, str(script), *args], cwd)


def python_cmd(script: str | Path, *args: str) -> list[str]:
    return [sys.executable, str(script), *args]


def safeopt_cmd(command: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "safeopt", command, *args]


def safeopt(command: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "safeopt", command, *args], cwd)


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def same_params(a: Path, b: Path) -> bool:
    sa, sb = torch.load(a), torch.load(b)
    return sa.keys() == sb.keys() and all(bit_equal(sa[k], sb[k]) for k in sa)


def by_hand(source: str, old: str, new: str) -> str:
    """``source`` with safeopt's class put in by hand: ``old`` (a line or an expression) made ``new``."""
    assert old in source, old
    return source.replace(old, new)


def load_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data
