"""Freezing branches: train one branch of a model at a time with one optimizer.

``opt.freeze(module)`` freezes the parameters of a module that the optimizer holds; a frozen
parameter, its grad and its Adam state stay bit-identical whatever its grad is. Unlike
``requires_grad_(False)``, nothing about autograd changes, and unlike building a second
optimizer, the moments of the branch resume where they stopped when it is unfrozen.

Run: ``python examples/freeze_branches.py``
"""

import torch
from torch import nn

import safeopt

torch.manual_seed(0)
model = nn.ModuleDict(
    {
        "trunk": nn.Linear(8, 16),
        "image_head": nn.Linear(16, 1),
        "text_head": nn.Linear(16, 1),
    }
)
opt = safeopt.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train(steps: int, head: str) -> None:
    for _ in range(steps):
        x = torch.randn(32, 8)
        target = x.sum(1, keepdim=True)
        loss = (model[head](torch.relu(model["trunk"](x))) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


train(20, "image_head")
train(20, "text_head")

# Phase 2: the trunk is frozen; both heads still get gradients, only the image head may move.
opt.freeze(model["trunk"])
opt.freeze(model["text_head"])
trunk = [p.detach().clone() for p in model["trunk"].parameters()]
text_state = {k: v.clone() for k, v in opt.state[model["text_head"].weight].items()}
for _ in range(20):
    x = torch.randn(32, 8)
    loss = (
        model["image_head"](torch.relu(model["trunk"](x))).pow(2).mean()
        + model["text_head"](torch.relu(model["trunk"](x))).pow(2).mean()
    )
    opt.zero_grad()
    loss.backward()  # every parameter gets a nonzero grad here
    opt.step()
assert all(torch.equal(p, b) for p, b in zip(model["trunk"].parameters(), trunk))
assert all(torch.equal(opt.state[model["text_head"].weight][k], v) for k, v in text_state.items())
assert opt.is_frozen(model["trunk"]) and not opt.is_frozen(model["image_head"])

# Phase 3: everything trains again, from the moments each branch had.
opt.unfreeze(model["trunk"])
opt.unfreeze(model["text_head"])
train(5, "text_head")
assert not all(torch.equal(p, b) for p, b in zip(model["trunk"].parameters(), trunk))
print(
    "trunk step count:",
    int(opt.state[model["trunk"].weight]["step"]),
    "(40 + 5: the frozen phase did not count)",
)
assert int(opt.state[model["trunk"].weight]["step"]) == 45
