"""Sparse embedding gradients: ``safeopt.Adam(lazy="rows")`` against ``torch.optim.SparseAdam``.

A recommender-style model scores (user, item) pairs with two ``nn.Embedding(sparse=True)`` tables;
item lookups are skewed (a few popular items, a long tail), so most rows are looked up rarely and
first appear late. Both optimizers take the sparse grads and leave rows that a batch did not look
up as they are. They differ in step counts: SparseAdam keeps one count for the whole table, so a
row looked up for the first time at step 40 is bias-corrected as if it had had 40 steps;
``lazy="rows"`` counts each row's own steps (``row_step``), so every row's first update is Adam's
first update, ``lr`` per element, whenever it comes. It also takes weight decay, AMSGrad and
``maximize``, which SparseAdam does not.

Run: ``python examples/sparse_embedding.py`` (``--plot PATH`` also draws each row's first update
against the step it first appeared in).
"""

import argparse

import torch
from torch import nn

import safeopt

USERS, ITEMS, DIM, BATCH, STEPS, LR = 1_000, 50_000, 16, 64, 40, 1e-2
BETAS, EPS = (0.9, 0.999), 1e-12  # a small eps: first updates then show the bias correction alone


class TwoTower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.users = nn.Embedding(USERS, DIM, sparse=True)
        self.items = nn.Embedding(ITEMS, DIM, sparse=True)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return (self.users(users) * self.items(items)).sum(-1)


def batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    true_users, true_items = torch.randn(USERS, 4, generator=gen), torch.randn(ITEMS, 4, generator=gen)
    out = []
    for _ in range(STEPS):
        users = torch.randint(0, USERS, (BATCH,), generator=gen)
        items = (torch.rand(BATCH, generator=gen) ** 4 * ITEMS).long()  # skewed: a popular head, a long tail
        out.append((users, items, (true_users[users] * true_items[items]).sum(-1)))
    return out


def train(
    make_opt: object,
) -> tuple[TwoTower, torch.optim.Optimizer, dict[int, tuple[int, float]], list[int]]:
    """Returns each item row's first step and the size of its update then (mean |change| / lr),
    and how many steps each item row took part in (rows of the coalesced grad with a nonzero entry)."""
    torch.manual_seed(0)
    model = TwoTower()
    opt = make_opt(model.parameters())  # type: ignore[operator]
    first: dict[int, tuple[int, float]] = {}
    took_part = [0] * ITEMS
    for step, (users, items, target) in enumerate(batches(), start=1):
        opt.zero_grad()
        (model(users, items) - target).pow(2).mean().backward()
        grad = model.items.weight.grad.coalesce()
        rows = grad.indices()[0][grad.values().ne(0).any(1)].tolist()
        new = [r for r in rows if r not in first]
        before = model.items.weight.detach()[new].clone()
        opt.step()
        change = (model.items.weight.detach()[new] - before).abs().mean(1) / LR
        first.update((r, (step, c)) for r, c in zip(new, change.tolist()))
        for r in rows:
            took_part[r] += 1
    return model, opt, first, took_part


def sparse_adam_first_update(t: int) -> float:
    """What SparseAdam's first update of a row at table step t is, per element, in units of lr."""
    b1, b2 = BETAS
    return (1 - b1) / (1 - b1**t) / ((1 - b2) / (1 - b2**t)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plot", help="write a PNG of each row's first update against its first step")
    args = parser.parse_args()

    torch.manual_seed(0)
    start = TwoTower().items.weight.detach().clone()

    sparse_model, sparse_opt, sparse_first, took_part = train(
        lambda p: torch.optim.SparseAdam(p, lr=LR, betas=BETAS, eps=EPS)
    )
    rows_model, rows_opt, rows_first, rows_took_part = train(
        lambda p: safeopt.Adam(p, lr=LR, betas=BETAS, eps=EPS, lazy="rows")
    )

    never = [r for r in range(ITEMS) if not took_part[r] and not rows_took_part[r]]
    for model in (sparse_model, rows_model):
        assert torch.equal(model.items.weight.detach()[never], start[never])  # untouched rows stay
    print(f"{ITEMS - len(never):,} of {ITEMS:,} item rows were looked up in {STEPS} steps")

    # Step counts: SparseAdam one for the table; lazy="rows" one per row.
    table = rows_opt.state[rows_model.items.weight]
    assert float(sparse_opt.state[sparse_model.items.weight]["step"]) == STEPS
    assert table["row_step"].tolist() == rows_took_part
    busiest = max(range(ITEMS), key=rows_took_part.__getitem__)
    tail = next(r for r in range(ITEMS - 1, -1, -1) if rows_took_part[r] == 1)
    print(f"SparseAdam: step {STEPS} for every row of the table")
    print(
        f'lazy="rows": row {busiest} took {rows_took_part[busiest]} steps, row {tail} took 1 '
        f"(row_step {int(table['row_step'][busiest])} and {int(table['row_step'][tail])})"
    )

    # First updates: Adam's first step is lr per element for lazy="rows", whenever the row first
    # appears; SparseAdam's depends on the table's step count at that moment.
    print('first step of a row | first update / lr: lazy="rows" | SparseAdam (measured, expected)')
    for t in (1, 2, 5, 10, 20, 40):
        rows_at = [c for s, c in rows_first.values() if s == t]
        sparse_at = [c for s, c in sparse_first.values() if s == t]
        if not rows_at or not sparse_at:
            continue
        mean_rows, mean_sparse = sum(rows_at) / len(rows_at), sum(sparse_at) / len(sparse_at)
        print(f"{t:19d} | {mean_rows:29.3f} | {mean_sparse:.3f}, {sparse_adam_first_update(t):.3f}")
    for step, change in rows_first.values():
        assert abs(change - 1) < 1e-3, (step, change)
    for step, change in sparse_first.values():
        assert abs(change - sparse_adam_first_update(step)) < 1e-3 * sparse_adam_first_update(step) + 1e-4

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for first, label, marker in (
            (sparse_first, "torch.optim.SparseAdam", "x"),
            (rows_first, 'safeopt.Adam(lazy="rows")', "o"),
        ):
            steps, changes = zip(*first.values())
            ax.scatter(steps, changes, s=8, marker=marker, label=label, alpha=0.6)
        ax.set_xlabel("step at which a row is first looked up")
        ax.set_ylabel("its first update / lr (mean per element)")
        ax.set_title("A row's first Adam update, by when it first appears")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
