"""Static grads, as CUDA graphs need them: zero grads, never None.

A captured forward/backward writes into the same ``.grad`` tensors on every replay, so grads
are zeroed in place (``zero_grad(set_to_none=False)``), never set to None. A branch the batch
does not use then has all-zero grads, which torch.optim steps anyway. safeopt's step, run
eagerly after the replay, skips such parameters. (safeopt decides on the host which parameters
take part, so capture the forward and backward, not ``opt.step()``.)

On a machine with CUDA the forward and backward are captured in a CUDA graph and replayed; on
the CPU the same loop runs eagerly with the same static tensors.

Run: ``python examples/cuda_graphs_static_grads.py``
"""

import torch
from torch import nn

import safeopt

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
model = nn.ModuleDict({"dense": nn.Linear(16, 16), "sparse_branch": nn.Linear(16, 16)}).to(device)
opt = safeopt.Adam(model.parameters(), lr=1e-3, capturable=device == "cuda")
static_x = torch.zeros(32, 16, device=device)
static_use_branch = torch.zeros((), device=device)  # 1.0 when the batch uses the branch


def forward_backward() -> None:
    h = model["dense"](static_x)
    h = h + static_use_branch * model["sparse_branch"](h)  # 0 * branch: its grads come out zero
    h.pow(2).mean().backward()


if device == "cuda":
    # torch's recipe: warm up on a side stream, then capture with grads set to None, so that the
    # graph's backward allocates the grads once, from its own pool, and rewrites them on replay.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            forward_backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        forward_backward()
    run = graph.replay  # never set the grads to None after this: the graph owns them
else:

    def run() -> None:
        opt.zero_grad(set_to_none=False)  # in place: the same grad tensors every step
        forward_backward()


for step in range(20):
    use_branch = step % 4 == 0
    static_x.copy_(torch.randn(32, 16))
    static_use_branch.fill_(float(use_branch))
    run()
    branch = [p.detach().clone() for p in model["sparse_branch"].parameters()]
    opt.step()
    moved = not all(torch.equal(p, b) for p, b in zip(model["sparse_branch"].parameters(), branch))
    assert moved == use_branch, step

print(
    "branch Adam steps:",
    int(opt.state[model["sparse_branch"].weight]["step"]),
    "of 20 (used every 4th batch)",
)
assert int(opt.state[model["sparse_branch"].weight]["step"]) == 5
