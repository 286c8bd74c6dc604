"""A small training run that checkpoints after every step; used by tests/test_crash_resume.py.

Usage: python train_ckpt.py CHECKPOINT STEPS [--slow]
Resumes from CHECKPOINT when it exists. Prints each finished step. ``--slow`` sleeps after each
step so that a test can kill the process mid-run.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from torch import nn

import safeopt


def main() -> None:
    path, steps, slow = sys.argv[1], int(sys.argv[2]), "--slow" in sys.argv
    torch.manual_seed(0)
    model = nn.ModuleDict({"left": nn.Linear(4, 4), "right": nn.Linear(4, 4)})
    opt = safeopt.Adam(
        [
            {"params": model["left"].parameters(), "name": "left"},
            {"params": model["right"].parameters(), "name": "right"},
        ],
        lr=0.05,
        weight_decay=0.1,
    )
    start = 0
    if os.path.exists(path):
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        start = saved["step"]
    for step in range(start, steps):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
        branch = "left" if step % 2 == 0 else "right"
        if step == 5:
            opt.freeze("right")
        opt.zero_grad(set_to_none=False)
        model[branch](x).pow(2).mean().backward()
        opt.step()
        tmp = path + ".tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}, tmp)
        os.replace(tmp, path)  # a kill never leaves a half-written checkpoint
        print(step + 1, flush=True)
        if slow:
            time.sleep(0.3)


if __name__ == "__main__":
    main()
