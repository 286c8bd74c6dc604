"""What the benchmarks measure: the models and shapes, the optimizers and their implementations.

Shared by ``bench_overhead.py``, ``bench_idle.py``, ``bench_rows.py`` and ``bench_moe.py``, so
every question is asked of the same workloads. A workload builds a list of parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Build = Callable[[], list[nn.Parameter]]


def _uniform(n: int, numel: int) -> Build:
    return lambda: [nn.Parameter(torch.randn(numel)) for _ in range(n)]


def _gpt2_small() -> list[nn.Parameter]:
    """A GPT-2-small-shaped transformer from torch.nn, random init (~124M parameters, 148 tensors)."""
    d, layers, vocab, ctx = 768, 12, 50257, 1024
    model = nn.ModuleDict(
        {
            "wte": nn.Embedding(vocab, d),
            "wpe": nn.Embedding(ctx, d),
            "h": nn.ModuleList(
                nn.TransformerEncoderLayer(d, 12, 4 * d, activation="gelu", batch_first=True, norm_first=True)
                for _ in range(layers)
            ),
            "ln_f": nn.LayerNorm(d),
        }
    )
    return list(model.parameters())


#: Many small tensors (where a per-parameter cost shows), medium and large ones, a real model.
WORKLOADS: dict[str, Build] = {
    "100 tiny (0.2M)": _uniform(100, 2_000),
    "40 medium (5M)": _uniform(40, 125_000),
    "16 large (34M)": _uniform(16, 2_125_000),
    "GPT-2 small (124M)": _gpt2_small,
}

#: lazy="rows": a table of short rows (an embedding) and one of long rows (grouped experts), with
#: the fractions of rows that get a gradient in a step.
ROW_WORKLOADS: dict[str, tuple[Build, tuple[float, ...]]] = {
    "embedding 1M x 64": (lambda: [nn.Parameter(torch.randn(1_000_000, 64))], (0.01, 0.1, 1.0)),
    "experts 64 x 512 x 512": (lambda: [nn.Parameter(torch.randn(64, 512, 512))], (0.125, 0.875, 1.0)),
}

OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict]] = {
    "Adam": (torch.optim.Adam, {"lr": 1e-3}),
    "AdamW": (torch.optim.AdamW, {"lr": 1e-3}),
    "SGD": (torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9}),
}
IMPLS: dict[str, dict[str, bool]] = {
    "forloop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


def optimizer(name: str, impl: str) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """The torch optimizer factory that ``safeopt.bench`` takes: ``name`` with implementation ``impl``."""
    cls, kwargs = OPTIMIZERS[name]
    return lambda params: cls(params, **kwargs, **IMPLS[impl])


def build(make: Build, device: str) -> list[nn.Parameter]:
    """A workload's parameters on ``device``, seeded: every run steps the same values."""
    torch.manual_seed(0)
    with torch.device(device):
        return make()


def _moe(experts: int, hidden: int, inter: int) -> Build:
    """One MoE layer's fused experts as transformers 5 keeps them: ``gate_up_proj [E, 2I, H]`` and
    ``down_proj [E, H, I]`` (each expert a contiguous slice)."""
    return lambda: [
        nn.Parameter(torch.randn(experts, 2 * inter, hidden) * 0.02),
        nn.Parameter(torch.randn(experts, hidden, inter) * 0.02),
    ]


#: Fused experts sized for the CPU, with the fractions of experts idle in a step.
MOE_WORKLOADS: dict[str, tuple[Build, tuple[float, ...]]] = {
    "64 experts, H 256, I 256 (12.6M)": (_moe(64, 256, 256), (0.0, 0.25, 0.5, 0.75)),
}
