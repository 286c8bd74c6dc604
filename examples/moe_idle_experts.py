"""A mixture-of-experts layer whose idle experts get zero grads.

An expert that receives no token in a batch still runs on an empty batch (or is masked to
zero), so its grads are zero tensors, not None, even with ``zero_grad(set_to_none=True)``.
torch.optim keeps moving it on its old moments; safeopt skips it and its step count, so an
expert's state reflects only the batches it actually saw.

Run: ``python examples/moe_idle_experts.py``
"""

import torch
from torch import nn

import safeopt


class TopOneMoE(nn.Module):
    def __init__(self, dim: int = 16, n_experts: int = 4) -> None:
        super().__init__()
        self.router = nn.Linear(dim, n_experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.GELU()) for _ in range(n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = self.router(x).softmax(-1)
        weight, choice = gate.max(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            idx = (choice == e).nonzero().flatten()
            out = out.index_add(0, idx, weight[idx, None] * expert(x[idx]))
        return out, choice


torch.manual_seed(0)
moe = TopOneMoE()
opt = safeopt.Adam(moe.parameters(), lr=1e-3)
reference = torch.optim.Adam([p.detach().clone().requires_grad_() for p in moe.parameters()], lr=1e-3)

used_steps = [0] * len(moe.experts)
for step in range(100):
    x = torch.randn(8, 16)  # few tokens: some experts get none in a batch
    out, choice = moe(x)
    loss = (out - x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    idle = [e for e in range(len(moe.experts)) if not (choice == e).any()]
    for e in idle:  # the idle experts' grads are zero tensors, not None
        assert all(p.grad is not None and not p.grad.any() for p in moe.experts[e].parameters())
    before = {e: [p.detach().clone() for p in moe.experts[e].parameters()] for e in idle}
    opt.step()
    for e in idle:
        assert all(torch.equal(p, b) for p, b in zip(moe.experts[e].parameters(), before[e]))
    for e in range(len(moe.experts)):
        used_steps[e] += e not in idle

counts = [int(opt.state[expert[0].weight]["step"]) for expert in moe.experts]
print("batches each expert saw:", used_steps, "Adam step counts:", counts)
assert counts == used_steps
