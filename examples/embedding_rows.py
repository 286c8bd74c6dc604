"""Row-lazy mode: an embedding table and grouped experts whose unused rows get zero gradient rows.

``nn.Embedding(sparse=False)`` (the default) gives a dense gradient: the rows a batch did not look
up are zero rows. Grouped mixture-of-experts weights keep every expert in one ``[E, ...]``
parameter: an expert that got no token has a zero slice. ``torch.optim.Adam`` moves all of those
rows on their old moments; ``safeopt.Adam`` with ``lazy="rows"`` leaves them bit-identical and
counts steps per row, so each row's bias correction reflects only the batches it was in.

Run: ``python examples/embedding_rows.py``
"""

import torch
from torch import nn

import safeopt


class TinyModel(nn.Module):
    def __init__(self, vocab: int = 200, dim: int = 8, n_experts: int = 4) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.experts = nn.Parameter(torch.randn(n_experts, dim, dim) / dim**0.5)  # grouped weights
        self.router = nn.Linear(dim, n_experts)
        self.head = nn.Linear(dim, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embedding(tokens)  # [batch, dim]
        choice = self.router(h).argmax(-1)  # top-1 expert per token
        mixed = torch.einsum("bd,bde->be", h, self.experts[choice])  # experts[e] gets grads only if chosen
        return self.head(torch.tanh(mixed)).squeeze(-1)


def train(
    opt_cls: type, **kwargs: object
) -> tuple[TinyModel, torch.optim.Optimizer, list[set[int]], list[set[int]], int]:
    """30 steps; also counts how often a row that was not looked up in a step moved in it."""
    torch.manual_seed(0)
    model = TinyModel()
    table = model.embedding.weight
    opt = opt_cls(
        [
            {"params": [table, model.experts], **kwargs},
            {"params": [*model.router.parameters(), *model.head.parameters()]},
        ],
        lr=1e-2,
    )
    seen_rows: list[set[int]] = []
    seen_experts: list[set[int]] = []
    idle_moves = 0
    for _ in range(30):
        tokens = torch.randint(0, 20, (6,))  # each batch looks up a few of the 200 rows
        loss = model(tokens).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        seen_rows.append(set(tokens.tolist()))
        with torch.no_grad():
            seen_experts.append(set(model.router(model.embedding(tokens)).argmax(-1).tolist()))
        before = table.detach().clone()
        opt.step()
        idle = [r for r in range(table.shape[0]) if r not in seen_rows[-1]]
        idle_moves += sum(not torch.equal(table[r], before[r]) for r in idle)
    return model, opt, seen_rows, seen_experts, idle_moves


torch.manual_seed(0)
start = TinyModel().embedding.weight.detach().clone()

model, opt, seen_rows, seen_experts, idle_moves = train(torch.optim.Adam)
print(f"torch.optim.Adam: {idle_moves} times a row moved in a step that did not look it up")
assert idle_moves > 0  # a row looked up once keeps moving on its moments ever after

model, opt, seen_rows, seen_experts, idle_moves = train(safeopt.Adam, lazy="rows")
table_state = opt.state[model.embedding.weight]
print(f'safeopt.Adam(lazy="rows"): {idle_moves} times')
assert idle_moves == 0
never = [r for r in range(start.shape[0]) if not any(r in s for s in seen_rows)]
assert all(torch.equal(model.embedding.weight[r], start[r]) for r in never)

# Each row's step count is the number of batches that looked it up; torch's "step" counts the
# steps in which any row was active (here: all 30).
per_row = [sum(r in s for s in seen_rows) for r in range(start.shape[0])]
assert table_state["row_step"].tolist() == per_row
assert float(table_state["step"]) == 30
print("steps of rows 0-9:", [int(c) for c in table_state["row_step"][:10].tolist()])

# The grouped experts: an expert no token chose in a batch kept its slice and its moments.
expert_counts = [sum(e in s for s in seen_experts) for e in range(model.experts.shape[0])]
expert_state = opt.state[model.experts]
assert min(expert_counts) < 30, "every expert was used in every batch: nothing to show"
assert expert_state["row_step"].tolist() == expert_counts
print("batches each expert saw:", expert_counts)
