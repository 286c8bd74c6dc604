"""A training script that knows nothing of safeopt: ``python -m safeopt watch`` and ``run`` on it.

A small model with an auxiliary branch that is switched off (its weight in the loss is 0.0 for
the first half of training, as a warm-up schedule would have it) and a plain ``torch.optim.AdamW``
with weight decay. ``zero_grad(set_to_none=False)`` leaves the branch with all-zero grads, and
AdamW moves it anyway. Nothing here imports safeopt: the commands find and fix that.

Run: ``python examples/idle_branch.py``, ``python -m safeopt watch examples/idle_branch.py``,
``python -m safeopt run examples/idle_branch.py``
"""

import torch
from torch import nn
from torch.optim import AdamW


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32))
        self.head = nn.Linear(32, 1)
        self.aux_head = nn.Linear(32, 8)  # auxiliary loss, off during warm-up

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.encoder(x))
        return self.head(h), self.aux_head(h)


torch.manual_seed(0)
model = Model()
optimizer = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
aux_start = model.aux_head.weight.detach().clone()
steps = 40
for step in range(steps):
    aux_weight = 0.0 if step < steps // 2 else 0.1  # the auxiliary loss starts half-way
    x = torch.randn(64, 8)
    y, aux = model(x)
    loss = (y - x.sum(1, keepdim=True)).pow(2).mean() + aux_weight * (aux - x).pow(2).mean()
    optimizer.zero_grad(set_to_none=False)
    loss.backward()
    optimizer.step()
    if step % 10 == 9:
        print(f"step {step + 1:>2}: loss {loss.item():.4f}")

drift = (model.aux_head.weight.detach() - aux_start).norm().item()
print(f"aux_head.weight moved {drift:.4f} from where it started")
