"""Static grads, as CUDA graphs need them: zero grads, never None; the whole step captured.

A captured forward/backward writes into the same ``.grad`` tensors on every replay, so grads
are zeroed in place, never set to None. A branch the batch does not use then has all-zero grads,
which torch.optim steps anyway. With ``fused=True, capturable=True`` safeopt decides on the
device, with no host synchronisation, so ``opt.step()`` is captured with the forward and
backward, and each replay skips the parameters whose grads are zero *in that replay*.

On a machine with CUDA the whole training step is captured in a CUDA graph and replayed; on the
CPU the same step runs eagerly (torch accepts fused capturable Adam there too, and safeopt's step
then reads nothing on the host either).

Run: ``python examples/cuda_graphs_static_grads.py``
"""

import torch
from torch import nn

import safeopt

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
model = nn.ModuleDict({"dense": nn.Linear(16, 16), "sparse_branch": nn.Linear(16, 16)}).to(device)
opt = safeopt.Adam(model.parameters(), lr=1e-3, fused=True, capturable=True)
static_x = torch.zeros(32, 16, device=device)
static_use_branch = torch.zeros((), device=device)  # 1.0 when the batch uses the branch


def train_step() -> None:
    h = model["dense"](static_x)
    h = h + static_use_branch * model["sparse_branch"](h)  # 0 * branch: its grads come out zero
    h.pow(2).mean().backward()
    opt.step()


if device == "cuda":
    # torch's whole-network capture recipe: warm up on a side stream (this makes the optimizer
    # state), then capture with grads set to None, so that the graph's backward allocates the
    # grads once, from its own pool, and rewrites them on every replay.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            train_step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        train_step()
    run = graph.replay  # never set the grads to None after this: the graph owns them
else:

    def run() -> None:
        opt.zero_grad(set_to_none=False)  # in place: the same grad tensors every step
        train_step()


for step in range(20):
    use_branch = step % 4 == 0
    static_x.copy_(torch.randn(32, 16))
    static_use_branch.fill_(float(use_branch))
    branch = [p.detach().clone() for p in model["sparse_branch"].parameters()]
    run()
    moved = not all(torch.equal(p, b) for p, b in zip(model["sparse_branch"].parameters(), branch))
    assert moved == use_branch, step

steps = int(opt.state[model["sparse_branch"].weight]["step"])
print("branch Adam steps:", steps, "of 20 (used every 4th batch)")
assert steps == 5
