"""One rank of the DDP test in tests/test_ddp.py (gloo, CPU).

Usage: python ddp_worker.py RANK WORLD PORT OUT [torch]
Two branches used alternately with find_unused_parameters=True and zero_grad(set_to_none=False).
Writes, per step, whether the idle branch stayed bit-identical, and the final parameters.
"""

from __future__ import annotations

import datetime
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import safeopt


class TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(4, 4)
        self.right = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        return getattr(self, branch)(x)


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    # A rank that dies leaves the other waiting in a collective: fail after a minute instead.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        run(rank, out, torch_optim=sys.argv[5:] == ["torch"])
        # No rank tears down gloo while the other is still using it (a rank whose peer closed the
        # connection first can abort in gloo's threads: "terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(rank: int, out: str, torch_optim: bool) -> None:
    torch.manual_seed(0)
    model = DistributedDataParallel(TwoBranch(), find_unused_parameters=True)
    opt_cls = torch.optim.Adam if torch_optim else safeopt.Adam
    opt = opt_cls(model.parameters(), lr=0.05, weight_decay=0.1)
    stayed = []
    for step in range(6):
        branch, idle = ("left", "right") if step % 2 == 0 else ("right", "left")
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(100 * step + rank))  # each rank its own data
        opt.zero_grad(set_to_none=False)
        model(x, branch).pow(2).mean().backward()
        before = [p.detach().clone() for p in getattr(model.module, idle).parameters()]
        opt.step()
        stayed.append(all(torch.equal(p, b) for p, b in zip(getattr(model.module, idle).parameters(), before)))
    torch.save({"stayed": stayed, "params": {k: v.detach().clone() for k, v in model.module.state_dict().items()},
                "steps": {i: float(s["step"]) for i, s in enumerate(opt.state.values())}}, out)


if __name__ == "__main__":
    main()
