"""Find the problem in existing code before switching: ``safeopt.audit`` and ``safeopt.watch``.

``audit(model, optimizer)`` compares what the model has with what the optimizer holds.
``watch(optimizer, model)`` records, without changing anything, how far each parameter moved in
steps where it had no gradient. Both work with any torch optimizer.

Run: ``python examples/find_the_ghost_update.py``
"""

import torch
from torch import nn

import safeopt

torch.manual_seed(0)
model = nn.ModuleDict({"encoder": nn.Linear(8, 16), "head": nn.Linear(16, 1)})
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
model["adapter"] = nn.Linear(16, 16)  # added after the optimizer was built: never trained

report = safeopt.audit(model, optimizer)
print(report, end="\n\n")
assert report and {f.kind for f in report.findings} == {"not_in_optimizer"}


def train(model: nn.Module, optimizer: torch.optim.Optimizer) -> safeopt.WatchReport:
    """The user's own loop, unchanged, under watch: the encoder is detached on odd epochs."""
    with safeopt.watch(optimizer, model) as w:
        for step in range(40):
            features = model["encoder"](torch.randn(32, 8))
            if (step // 10) % 2 == 1:
                features = features.detach()
            optimizer.zero_grad(set_to_none=False)
            model["head"](features).pow(2).mean().backward()
            optimizer.step()
    return w.report()


report = train(model, optimizer)
print(report, end="\n\n")
assert {row.name for row in report.moved} == {"encoder.weight", "encoder.bias"}

# The same loop with safeopt.AdamW: nothing moves without a gradient.
torch.manual_seed(0)
model = nn.ModuleDict({"encoder": nn.Linear(8, 16), "head": nn.Linear(16, 1)})
report = train(model, safeopt.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
print(report)
assert not report
