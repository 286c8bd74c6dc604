"""One rank of tests/test_edges_watch.py's distributed watch test (gloo on CPU, two ranks).

Usage: python watch_worker.py OUT_DIR WATCHERS, with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT in the environment. FSDP2 (the model of dist_worker.py), torch.optim.Adam with weight
decay and zero_grad(set_to_none=False), three steps; the ranks listed in WATCHERS ("0" or "0,1")
watch the optimizer, the others do not. Writes OUT_DIR/watch-rank<RANK>.pt: the rank's report.
The process group times out after 20 seconds, so a watch that waits in a collective fails fast.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from dist_worker import Sharded, shard

import safeopt


def run(rank: int, watchers: set[int]) -> dict[str, Any]:
    torch.manual_seed(0)
    model = shard(Sharded())
    opt = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.1)
    w = safeopt.watch(opt, model) if rank in watchers else None
    with w if w is not None else contextlib.nullcontext():
        for step in range(3):
            gen = torch.Generator().manual_seed(10 * step + rank)
            idx = torch.randint(0, 4, (6,), generator=gen)  # rows 0-3 only: rank 0's shard of emb
            opt.zero_grad(set_to_none=False)
            model(idx).pow(2).mean().backward()
            opt.step()
    if w is None:
        return {"watched": False}
    report = w.report()
    return {
        "watched": True,
        "steps": report.steps,
        # whole parameters without a gradient (a parameter with idle rows only has idle_steps 0)
        "idle": {p.name: p.idle_steps for p in report.params if p.idle_steps},
        "moved": {p.name: p.moved_steps for p in report.params if p.idle_steps},
        "shapes": {p.name: p.shape for p in report.params},
    }


def main() -> None:
    out_dir, watchers = sys.argv[1], {int(r) for r in sys.argv[2].split(",")}
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    try:
        result = run(rank, watchers)
        torch.save(result, os.path.join(out_dir, f"watch-rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
