"""Progressive unfreezing for fine-tuning: unfreeze one block per epoch, from the top.

The optimizer is built once over the whole model with every backbone block frozen; each epoch
``opt.unfreeze(block)`` lets the next block train. Frozen blocks are bit-identical, take no
weight decay and keep no step count, so a block's bias correction starts at its first step,
as it would with an optimizer built when it was unfrozen; no second optimizer, no
``add_param_group``, and the LR scheduler sees one optimizer throughout.

Run: ``python examples/progressive_unfreezing.py``
"""

import torch
from torch import nn

import safeopt

torch.manual_seed(0)
backbone = nn.Sequential(*(nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(4)))  # "pretrained"
head = nn.Linear(16, 2)
model = nn.Sequential(backbone, head)

opt = safeopt.AdamW(
    [
        {"params": backbone.parameters(), "lr": 1e-4, "name": "backbone"},
        {"params": head.parameters(), "lr": 1e-3},
    ],
    weight_decay=0.01,
)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5 * 10)
for block in backbone:
    opt.freeze(block)

pretrained = [[p.detach().clone() for p in block.parameters()] for block in backbone]
x, y = torch.randn(256, 16), torch.randint(2, (256,))
for epoch in range(5):
    if epoch > 0:
        opt.unfreeze(backbone[-epoch])  # epoch 1: the last block, epoch 2: the one before, ...
    for i in range(10):
        batch = slice(i * 25, (i + 1) * 25)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        scheduler.step()
    trained = [
        not all(torch.equal(p, b) for p, b in zip(block.parameters(), before))
        for block, before in zip(backbone, pretrained)
    ]
    print(f"epoch {epoch}: blocks trained so far {trained}")
    assert trained == [i >= 4 - epoch for i in range(4)]

# A block's step count is the number of steps since it was unfrozen.
steps = [
    int(opt.state[block[0].weight]["step"]) if opt.state.get(block[0].weight) else 0 for block in backbone
]
print("Adam step count per block:", steps)
assert steps == [10, 20, 30, 40]
