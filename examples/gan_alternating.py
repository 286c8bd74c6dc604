"""Alternating GAN training with one optimizer over both networks.

One ``safeopt.Adam`` holds the generator and the discriminator as two named param groups.
In the discriminator's step the generator's grads are zero (its output is detached), and in the
generator's step the discriminator is switched off with ``requires_grad_(False)``, so its grads
stay zero: with ``torch.optim.Adam`` each network would keep moving on its old moments during
the other's step. safeopt leaves it alone; ``opt.frozen(...)`` says the same thing explicitly.

Run: ``python examples/gan_alternating.py``
"""

import torch
from torch import nn
from torch.nn import functional as F

import safeopt

torch.manual_seed(0)
gen = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))
disc = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 1))
opt = safeopt.Adam(
    [
        {"params": gen.parameters(), "name": "generator"},
        {"params": disc.parameters(), "name": "discriminator"},
    ],
    lr=2e-3,
    betas=(0.5, 0.999),
)


def snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def unchanged(module: nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, b) for p, b in zip(module.parameters(), before))


real_center = torch.tensor([2.0, -1.0])
for step in range(200):
    real = real_center + 0.1 * torch.randn(64, 2)
    z = torch.randn(64, 4)

    # Discriminator step: the generator gets zero grads and must not move.
    opt.zero_grad(set_to_none=False)
    d_loss = F.binary_cross_entropy_with_logits(
        disc(real), torch.ones(64, 1)
    ) + F.binary_cross_entropy_with_logits(disc(gen(z).detach()), torch.zeros(64, 1))
    d_loss.backward()
    g_before = snapshot(gen)
    opt.step()
    assert unchanged(gen, g_before)

    # Generator step: the discriminator is switched off; frozen() makes that explicit, and
    # would also cover a discriminator that still got grads.
    opt.zero_grad(set_to_none=False)
    disc.requires_grad_(False)
    g_loss = F.binary_cross_entropy_with_logits(disc(gen(z)), torch.ones(64, 1))
    g_loss.backward()
    disc.requires_grad_(True)
    d_before = snapshot(disc)
    with opt.frozen("discriminator"):
        opt.step()
    assert unchanged(disc, d_before)

# Each network's Adam step count is the number of its own steps: 200, not 400.
assert all(int(opt.state[p]["step"]) == 200 for p in [*gen.parameters(), *disc.parameters()])
fake_center = gen(torch.randn(1000, 4)).mean(0).detach()
print(f"generated mean {fake_center.tolist()} (target {real_center.tolist()})")
assert torch.dist(fake_center, real_center) < 0.5
